"""UserManager: accounts and sessions (not built yet: answers UNIMPLEMENTED)."""

from __future__ import annotations

from typing import Any

import grpc

from nodepool.servicers._unavailable import not_implemented
from nodepool.v1 import user_manager_pb2 as pb
from nodepool.v1 import user_manager_pb2_grpc as pb_grpc

__all__ = ["UserManagerServicer"]

_Context = grpc.aio.ServicerContext[Any, Any]


class UserManagerServicer(pb_grpc.UserManagerServicer):
    async def RegisterUser(
        self, request: pb.RegisterUserRequest, context: _Context
    ) -> pb.RegisterUserResponse:
        await not_implemented(context)

    async def LoginUser(
        self, request: pb.LoginUserRequest, context: _Context
    ) -> pb.LoginUserResponse:
        await not_implemented(context)

    async def UpdateUserProfile(
        self, request: pb.UpdateUserProfileRequest, context: _Context
    ) -> pb.UpdateUserProfileResponse:
        await not_implemented(context)

    async def GetUserInfo(
        self, request: pb.GetUserInfoRequest, context: _Context
    ) -> pb.GetUserInfoResponse:
        await not_implemented(context)
