"""UserManager: accounts, sessions, API keys and roles, over :class:`Accounts`."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import grpc

from nodepool.auth.principal import current_principal
from nodepool.domain.accounts import Accounts, Session
from nodepool.servicers._convert import api_key_message, timestamp, user_message
from nodepool.status import translate_errors
from nodepool.v1 import user_manager_pb2 as pb
from nodepool.v1 import user_manager_pb2_grpc as pb_grpc

__all__ = ["UserManagerServicer"]

_Context = grpc.aio.ServicerContext[Any, Any]


def _peer_host(context: _Context) -> str:
    # "ipv4:127.0.0.1:5555" or "ipv6:%5B::1%5D:5555": rate limits count per address.
    return unquote(context.peer()).rpartition(":")[0] or "unknown"


def _session_message(session: Session) -> pb.LoginUserResponse:
    return pb.LoginUserResponse(
        success=True,
        message="logged in",
        access_token=session.access_token,
        refresh_token=session.refresh_token,
        access_token_expires_at=timestamp(session.access_expires_at),
        refresh_token_expires_at=timestamp(session.refresh_expires_at),
        token_type="Bearer",  # noqa: S106 - the scheme name, not a secret
    )


class UserManagerServicer(pb_grpc.UserManagerServicer):
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    async def RegisterUser(
        self, request: pb.RegisterUserRequest, context: _Context
    ) -> pb.RegisterUserResponse:
        async with translate_errors(context):
            user = await self._accounts.register(
                request.username, request.password, request.email, _peer_host(context)
            )
        return pb.RegisterUserResponse(success=True, message="registered", user=user_message(user))

    async def LoginUser(
        self, request: pb.LoginUserRequest, context: _Context
    ) -> pb.LoginUserResponse:
        async with translate_errors(context):
            session = await self._accounts.login(
                request.username,
                request.password,
                _peer_host(context),
                current_principal().peer.spiffe_id,
            )
        return _session_message(session)

    async def RefreshToken(
        self, request: pb.RefreshTokenRequest, context: _Context
    ) -> pb.LoginUserResponse:
        async with translate_errors(context):
            session = await self._accounts.refresh(
                request.refresh_token, current_principal().peer.spiffe_id
            )
        return _session_message(session)

    async def LogoutUser(
        self, request: pb.LogoutUserRequest, context: _Context
    ) -> pb.LogoutUserResponse:
        async with translate_errors(context):
            await self._accounts.logout(current_principal())
        return pb.LogoutUserResponse(success=True, message="logged out")

    async def UpdateUserProfile(
        self, request: pb.UpdateUserProfileRequest, context: _Context
    ) -> pb.UpdateUserProfileResponse:
        async with translate_errors(context):
            user = await self._accounts.update_profile(
                current_principal(),
                request.username,
                email=request.email if request.HasField("email") else None,
                current_password=request.current_password,
                new_password=request.new_password,
                keep_api_keys=request.keep_api_keys,
            )
        return pb.UpdateUserProfileResponse(
            success=True, message="updated", user=user_message(user)
        )

    async def GetUserInfo(
        self, request: pb.GetUserInfoRequest, context: _Context
    ) -> pb.GetUserInfoResponse:
        async with translate_errors(context):
            user = await self._accounts.get_user(current_principal(), request.username)
        return pb.GetUserInfoResponse(user=user_message(user))

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: _Context
    ) -> pb.CreateApiKeyResponse:
        async with translate_errors(context):
            record, secret = await self._accounts.create_api_key(
                current_principal(),
                owner=request.owner,
                name=request.name,
                scopes=list(request.scopes),
                ttl_days=request.ttl_days,
                bound_device=request.bound_device,
            )
        return pb.CreateApiKeyResponse(api_key=api_key_message(record), secret=secret)

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: _Context
    ) -> pb.ListApiKeysResponse:
        async with translate_errors(context):
            keys = await self._accounts.list_api_keys(current_principal(), request.owner)
        return pb.ListApiKeysResponse(api_keys=[api_key_message(key) for key in keys])

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: _Context
    ) -> pb.RevokeApiKeyResponse:
        async with translate_errors(context):
            record = await self._accounts.revoke_api_key(current_principal(), request.key_id)
        return pb.RevokeApiKeyResponse(api_key=api_key_message(record))

    async def GrantRole(
        self, request: pb.ChangeRoleRequest, context: _Context
    ) -> pb.ChangeRoleResponse:
        async with translate_errors(context):
            user = await self._accounts.grant_role(
                current_principal(), request.username, request.role
            )
        return pb.ChangeRoleResponse(user=user_message(user))

    async def RevokeRole(
        self, request: pb.ChangeRoleRequest, context: _Context
    ) -> pb.ChangeRoleResponse:
        async with translate_errors(context):
            user = await self._accounts.revoke_role(
                current_principal(), request.username, request.role
            )
        return pb.ChangeRoleResponse(user=user_message(user))

    async def SetUserActive(
        self, request: pb.SetUserActiveRequest, context: _Context
    ) -> pb.SetUserActiveResponse:
        async with translate_errors(context):
            user = await self._accounts.set_active(
                current_principal(),
                request.username,
                request.is_active,
                keep_api_keys=request.keep_api_keys,
            )
        return pb.SetUserActiveResponse(user=user_message(user))
