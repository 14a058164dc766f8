"""``nodepool user``, ``nodepool apikey`` and ``nodepool audit``: accounts over gRPC.

``nodepool user create-admin`` and ``nodepool user reset-password`` are the local commands
here: they write to the database on the server host, because the first administrator is
never made by a remote caller, and a lost administrator password has no remote way back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from rich.text import Text

from nodepool.cli.connection import SavedSession, client_options, connect, read_password
from nodepool.cli.errors import CommandError
from nodepool.cli.local import admin_settings
from nodepool.cli.output import (
    emit_json,
    json_option,
    page_json,
    page_options,
    print_table,
    status_text,
    wide_option,
)
from nodepool.errors import NodePoolError
from nodepool.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    certificates_pb2,
    master_node_pb2,
    node_manager_pb2,
    user_manager_pb2,
    user_manager_pb2_grpc,
)

__all__ = ["apikey", "audit", "user"]

_password_file = click.option(
    "--password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="read the password from this file [or NODEPOOL_PASSWORD, or a prompt]",
)
# The roles a person can hold (nodepool.domain.accounts.ADMIN and USER, which the server
# side imports; the CLI does not load the domain and store for every command).
ADMIN = "admin"
USER = "user"

_json = json_option
_config = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="the server's TOML settings file (NODEPOOL_* environment variables win over it)",
)


def _when(message: Any, field: str) -> str:
    if not message.HasField(field):
        return "-"
    return str(getattr(message, field).ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC"))


def _show_user(user: user_manager_pb2.User) -> None:
    print_table(
        f"user {user.username}",
        ("field", "value"),
        [
            ("username", user.username),
            ("email", user.email or "-"),
            ("roles", ", ".join(user.roles)),
            ("active", status_text("active" if user.is_active else "inactive")),
            ("created", _when(user, "created_at")),
            ("last login", _when(user, "last_login")),
        ],
    )


@click.group()
def user() -> None:
    """Accounts and sessions."""


@user.command("register")
@click.argument("username")
@click.option("--email", default="", help="contact address")
@_password_file
@client_options
def user_register(
    username: str,
    email: str,
    password_file: Path | None,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Create an account (needs only this device's client certificate)."""
    password = read_password(password_file, confirm=True)
    with connect(server, cert, key, ca) as conn:
        stub = user_manager_pb2_grpc.UserManagerStub(conn.channel)
        reply = conn.call(
            stub.RegisterUser,
            user_manager_pb2.RegisterUserRequest(username=username, password=password, email=email),
            auth=False,
        )
    click.echo(f"registered {reply.user.username}", err=True)


@user.command("login")
@click.argument("username")
@_password_file
@client_options
def user_login(
    username: str,
    password_file: Path | None,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Log in; the session is kept under NODEPOOL_HOME (mode 0600)."""
    password = read_password(password_file)
    with connect(server, cert, key, ca) as conn:
        stub = user_manager_pb2_grpc.UserManagerStub(conn.channel)
        reply = conn.call(
            stub.LoginUser,
            user_manager_pb2.LoginUserRequest(username=username, password=password),
            auth=False,
        )
        conn.save_session(SavedSession.from_reply(conn.target, username, reply))
    where = f" (context {conn.context})" if conn.context else ""
    click.echo(f"logged in as {username}{where}", err=True)


@user.command("logout")
@client_options
def user_logout(server: str | None, cert: str | None, key: str | None, ca: str | None) -> None:
    """End the session on the server and forget it here."""
    with connect(server, cert, key, ca) as conn:
        stub = user_manager_pb2_grpc.UserManagerStub(conn.channel)
        conn.call(stub.LogoutUser, user_manager_pb2.LogoutUserRequest())
        conn.forget_session()
    click.echo("logged out", err=True)


@user.command("info")
@click.argument("username", required=False, default="")
@_json
@client_options
def user_info(
    username: str,
    as_json: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Show your account, or any account if you are an admin."""
    with connect(server, cert, key, ca) as conn:
        stub = user_manager_pb2_grpc.UserManagerStub(conn.channel)
        reply = conn.call(stub.GetUserInfo, user_manager_pb2.GetUserInfoRequest(username=username))
    if as_json:
        emit_json(reply.user)
    else:
        _show_user(reply.user)


@user.command("update")
@click.option("--username", default="", help="another user's account (admins only)")
@click.option("--email", default=None, help="new contact address ('' clears it)")
@click.option("--change-password", is_flag=True, help="prompt for the old and a new password")
@click.option(
    "--new-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="read the new password from this file",
)
@click.option(
    "--keep-api-keys",
    is_flag=True,
    help="keep the account's API keys through a password change (recorded in the audit log)",
)
@_password_file
@client_options
def user_update(
    username: str,
    email: str | None,
    change_password: bool,
    new_password_file: Path | None,
    keep_api_keys: bool,
    password_file: Path | None,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Change the email address or the password.

    A new password ends your other sessions and revokes your API keys unless you pass
    --keep-api-keys.
    """
    if email is None and not change_password and new_password_file is None:
        raise click.UsageError(
            "nothing to change: give --email, --change-password or --new-password-file"
        )
    current = new = ""
    if change_password or new_password_file is not None:
        current = read_password(password_file)
        if new_password_file is not None:
            new = read_password(new_password_file)
        else:
            new = click.prompt("New password", hide_input=True, confirmation_prompt=True, err=True)
    request = user_manager_pb2.UpdateUserProfileRequest(
        username=username, current_password=current, new_password=new, keep_api_keys=keep_api_keys
    )
    if email is not None:
        request.email = email
    with connect(server, cert, key, ca) as conn:
        stub = user_manager_pb2_grpc.UserManagerStub(conn.channel)
        reply = conn.call(stub.UpdateUserProfile, request)
    click.echo(f"updated {reply.user.username}", err=True)


def _change_role(grant: bool, username: str, role: str, options: tuple[Any, ...]) -> None:
    with connect(*options) as conn:
        stub = user_manager_pb2_grpc.UserManagerStub(conn.channel)
        method = stub.GrantRole if grant else stub.RevokeRole
        reply = conn.call(method, user_manager_pb2.ChangeRoleRequest(username=username, role=role))
    click.echo(f"{reply.user.username}: roles {', '.join(reply.user.roles)}", err=True)


@user.command("grant")
@click.argument("username")
@click.argument("role", type=click.Choice([USER, ADMIN]))
@client_options
def user_grant(
    username: str, role: str, server: str | None, cert: str | None, key: str | None, ca: str | None
) -> None:
    """Give a user a role (admins only; you must hold the role yourself)."""
    _change_role(True, username, role, (server, cert, key, ca))


@user.command("revoke-role")
@click.argument("username")
@click.argument("role", type=click.Choice([USER, ADMIN]))
@client_options
def user_revoke_role(
    username: str, role: str, server: str | None, cert: str | None, key: str | None, ca: str | None
) -> None:
    """Take a role from a user (admins only)."""
    _change_role(False, username, role, (server, cert, key, ca))


def _set_active(
    username: str, active: bool, options: tuple[Any, ...], keep_api_keys: bool = False
) -> None:
    with connect(*options) as conn:
        stub = user_manager_pb2_grpc.UserManagerStub(conn.channel)
        conn.call(
            stub.SetUserActive,
            user_manager_pb2.SetUserActiveRequest(
                username=username, is_active=active, keep_api_keys=keep_api_keys
            ),
        )
    click.echo(f"{username} {'activated' if active else 'deactivated'}", err=True)


@user.command("deactivate")
@click.argument("username")
@click.option(
    "--keep-api-keys", is_flag=True, help="do not revoke the account's API keys (audited)"
)
@client_options
def user_deactivate(
    username: str,
    keep_api_keys: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Disable an account, end its sessions and revoke its API keys (admins only)."""
    _set_active(username, False, (server, cert, key, ca), keep_api_keys)


@user.command("activate")
@click.argument("username")
@client_options
def user_activate(
    username: str, server: str | None, cert: str | None, key: str | None, ca: str | None
) -> None:
    """Enable an account again (admins only)."""
    _set_active(username, True, (server, cert, key, ca))


@user.command("create-admin")
@click.argument("username")
@click.option("--email", default="", help="contact address")
@_password_file
@_config
def user_create_admin(
    username: str, email: str, password_file: Path | None, config_file: Path | None
) -> None:
    """Create an administrator directly in the database (run on the server host)."""
    from nodepool.domain.accounts import register_account
    from nodepool.server.auth import password_hasher
    from nodepool.store import StoreError, open_store

    settings = admin_settings(config_file)
    password = read_password(password_file, confirm=True)
    try:
        store = open_store(settings.database_url)
    except StoreError as exc:
        raise CommandError(f"database: cannot open ({exc})") from None
    hasher = password_hasher(settings)

    async def hash_password(password: str) -> str:
        return await asyncio.to_thread(hasher.hash, password)

    try:
        created = asyncio.run(
            register_account(store, hash_password, username, password, email, (USER, ADMIN))
        )
    except NodePoolError as exc:
        raise CommandError(exc.public_message) from None
    finally:
        store.close()
    click.echo(f"administrator {created.username} created", err=True)


@user.command("reset-password")
@click.argument("username")
@_password_file
@_config
def user_reset_password(
    username: str, password_file: Path | None, config_file: Path | None
) -> None:
    """Set a new password directly in the database (run on the server host).

    For a lost password, the administrator's too. The user's sessions end on every server
    within seconds; API keys keep working.
    """
    from nodepool.auth.passwords import validate_password
    from nodepool.server.auth import password_hasher
    from nodepool.store import NotFound, StoreError, open_store

    settings = admin_settings(config_file)
    password = read_password(password_file, confirm=True)
    try:
        validate_password(password, username=username)
    except NodePoolError as exc:
        raise CommandError(exc.public_message) from None
    try:
        store = open_store(settings.database_url)
    except StoreError as exc:
        raise CommandError(f"database: cannot open ({exc})") from None
    try:
        store.get_user(username)
        password_hash = password_hasher(settings).hash(password)
        store.update_user_fields(username, password_hash=password_hash)
        ended = store.revoke_sessions_of_user(username, reason="password reset")
    except NotFound:
        raise CommandError(f"no user {username!r} in {settings.database_url}") from None
    except StoreError as exc:
        raise CommandError(f"database: {exc}") from None
    finally:
        store.close()
    click.echo(f"password of {username} reset; {len(ended)} session(s) ended", err=True)


@click.group()
def apikey() -> None:
    """API keys for automation (sent as x-api-key, or NODEPOOL_API_KEY)."""


@apikey.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, type=click.Choice([USER, ADMIN]))
@click.option("--days", type=click.IntRange(1, 365), default=None, help="lifetime [default 90]")
@click.option("--owner", default="", help="another user's key (admins only)")
@click.option(
    "--bind-device",
    is_flag=True,
    help="the key works only through this device's certificate identity",
)
@click.option(
    "--bind-device-id",
    default="",
    metavar="SPIFFE_ID",
    help="the key works only through the client certificate with this identity",
)
@_json
@client_options
def apikey_create(
    name: str,
    scopes: tuple[str, ...],
    days: int | None,
    owner: str,
    bind_device: bool,
    bind_device_id: str,
    as_json: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Create a key. The key is printed this once and never again.

    Without --bind-device or --bind-device-id the key works from any device (for
    automation that moves between machines); listings mark it "any device".
    """
    if bind_device and bind_device_id:
        raise CommandError("give --bind-device or --bind-device-id, not both")
    with connect(server, cert, key, ca) as conn:
        device = (
            _own_device(conn.endpoint.cert) if conn.endpoint and bind_device else bind_device_id
        )
        stub = user_manager_pb2_grpc.UserManagerStub(conn.channel)
        reply = conn.call(
            stub.CreateApiKey,
            user_manager_pb2.CreateApiKeyRequest(
                name=name,
                scopes=list(scopes),
                ttl_days=days or 0,
                owner=owner,
                bound_device=device,
            ),
        )
    if as_json:
        emit_json(reply)
        return
    click.echo(
        f"key id {reply.api_key.key_id}, expires {_when(reply.api_key, 'expires_at')}", err=True
    )
    click.echo("store this key now; it is not shown again:", err=True)
    click.echo(reply.secret)


def _own_device(cert_path: Path) -> str:
    """The URI SAN of the client certificate this command connects with."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    except (OSError, ValueError, x509.ExtensionNotFound):
        raise CommandError("--bind-device: cannot read this device's certificate") from None
    spiffe = [uri for uri in uris if uri.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise CommandError("--bind-device: this device's certificate has no identity")
    return spiffe[0]


@apikey.command("list")
@click.option("--owner", default="", help="another user's keys (admins only)")
@_json
@wide_option
@client_options
def apikey_list(
    owner: str,
    as_json: bool,
    wide: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """List keys (never their secrets)."""
    with connect(server, cert, key, ca) as conn:
        stub = user_manager_pb2_grpc.UserManagerStub(conn.channel)
        reply = conn.call(stub.ListApiKeys, user_manager_pb2.ListApiKeysRequest(owner=owner))
    if as_json:
        emit_json(reply)
        return
    print_table(
        "API keys",
        ("key id", "name", "owner", "scopes", "device", "status", "expires", "last used"),
        [
            (
                k.key_id,
                k.name,
                k.owner,
                ", ".join(k.scopes),
                k.bound_device or "any device (unbound)",
                status_text("revoked" if k.HasField("revoked_at") else "active"),
                _when(k, "expires_at"),
                _when(k, "last_used_at"),
            )
            for k in reply.api_keys
        ],
        wide=wide,
        empty="no API keys",
    )


@apikey.command("revoke")
@click.argument("key_id")
@client_options
def apikey_revoke(
    key_id: str, server: str | None, cert: str | None, key: str | None, ca: str | None
) -> None:
    """Revoke a key; it stops working on every server within moments."""
    with connect(server, cert, key, ca) as conn:
        stub = user_manager_pb2_grpc.UserManagerStub(conn.channel)
        conn.call(stub.RevokeApiKey, user_manager_pb2.RevokeApiKeyRequest(key_id=key_id))
    click.echo(f"revoked {key_id}", err=True)


@click.group()
def audit() -> None:
    """The audit log (admins only)."""


_SERVICES = (
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
    certificates_pb2.DESCRIPTOR.services_by_name["CertificateService"],
    master_node_pb2.DESCRIPTOR.services_by_name["MasterNodeService"],
    node_manager_pb2.DESCRIPTOR.services_by_name["NodeManager"],
    user_manager_pb2.DESCRIPTOR.services_by_name["UserManager"],
)


def _full_method(method: str) -> str:
    """``LoginUser`` or ``UserManager/LoginUser`` as the log records it, ``/pkg.Svc/M``."""
    if not method or method.startswith("/"):
        return method
    service, _, name = method.rpartition("/")
    found = [
        f"/{s.full_name}/{name}"
        for s in _SERVICES
        if name in s.methods_by_name and service in ("", s.name, s.full_name)
    ]
    if name == "Check" and service in ("", "Health", "grpc.health.v1.Health"):
        found.append("/grpc.health.v1.Health/Check")
    if len(found) != 1:
        raise click.BadParameter(
            f"{method!r} is {'ambiguous' if found else 'not a method of Node Pool'} "
            "(as shown in the method column, e.g. LoginUser)",
            param_hint="--method",
        )
    return found[0]


@audit.command("list")
@click.option(
    "--limit",
    type=click.IntRange(1, 500),
    default=50,
    show_default=True,
    help="entries per page",
)
@click.option(
    "--user", "username", default="", help="only calls made as this user (a login, an API key)"
)
@click.option(
    "--method", default="", help="only this method, as the table shows it (e.g. LoginUser)"
)
@click.option(
    "--outcome",
    type=click.Choice(["allowed", "denied", "failed"]),
    default=None,
    help="only calls that were allowed, denied (refused by a check), or failed",
)
@page_options
@_json
@wide_option
@client_options
def audit_list(
    limit: int,
    username: str,
    method: str,
    outcome: str | None,
    page_token: str,
    all_pages: bool,
    as_json: bool,
    wide: bool,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Newest entries first; a page at a time unless --all."""
    full_method = _full_method(method)
    events: list[audit_pb2.AuditEvent] = []
    with connect(server, cert, key, ca) as conn:
        stub = audit_pb2_grpc.AuditServiceStub(conn.channel)
        while True:
            reply = conn.call(
                stub.ListAuditEvents,
                audit_pb2.ListAuditEventsRequest(
                    page_size=limit,
                    page_token=page_token,
                    username=username,
                    method=full_method,
                    outcome=outcome or "",
                ),
            )
            events.extend(reply.events)
            page_token = reply.next_page_token
            if not all_pages or not page_token:
                break
    if as_json:
        emit_json(page_json("events", events, page_token))
        return
    print_table(
        "audit log",
        ("at", "outcome", "code", "method", "principal", "user", "peer"),
        [
            (
                _when(e, "at"),
                status_text(e.outcome),
                Text(e.code),
                e.method.rsplit("/", 1)[-1],
                e.principal,
                e.username or "-",
                e.peer,
            )
            for e in events
        ],
        wide=wide,
        empty="no entries",
    )
    if page_token:
        click.echo(f"more: --page-token {page_token} (or --all)", err=True)
