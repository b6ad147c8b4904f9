"""E-mail over SMTP (the standard library's client): one message per call, STARTTLS and login when configured.
Blocking: call from a thread."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import make_msgid

from gateway.core.errors import DeliveryError


def send_mail(
    *,
    host: str,
    port: int,
    sender: str,
    to: str,
    subject: str,
    body: str,
    timeout_s: float = 10.0,
    starttls: bool = False,
    username: str = "",
    password: str = "",
) -> str:
    """Send one plain-text message; returns its Message-ID. Raises ``DeliveryError`` when the relay refuses it
    or cannot be reached."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    message.set_content(body)
    try:
        with smtplib.SMTP(host, port, timeout=timeout_s) as client:
            if starttls:
                client.starttls(context=ssl.create_default_context())
            if username:
                client.login(username, password)
            refused = client.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise DeliveryError(f"e-mail via {host}:{port} failed: {type(exc).__name__}: {exc}") from exc
    if refused:
        raise DeliveryError(f"e-mail via {host}:{port} refused for {len(refused)} recipient(s)")
    return str(message["Message-ID"])
