"""config.toml -> frozen, validated dataclasses.

Every validation error names the offending key (``smtp.port``) and says why; unknown keys
are errors too, so a typo is never silently ignored. Nothing here opens sockets or files
other than the config file itself and the TLS files it names.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import ipaddress
import os
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from email_validator import EmailNotValidError, validate_email

from . import businesstime
from .businesstime import BusinessHours, BusinessTimeError, Duration
from .upset import DEFAULT_THRESHOLD as UPSET_DEFAULT_THRESHOLD

DEFAULT_CONFIG_NAME = "config.toml"
CONFIG_ENV = "GATEWAY_CONFIG"

_T = typing.TypeVar("_T")

# Command budgets per session, after Postfix's junk-command model (RELIABILITY.md part 3).
# "*" is every command not named. MAIL/RCPT/DATA are bounded by the per-connection message
# and recipient limits instead, so their budgets here only have to be out of the way.
DEFAULT_COMMAND_LIMITS: Mapping[str, int] = types.MappingProxyType(
    {
        "*": 20,
        "NOOP": 10,
        "RSET": 50,
        "HELO": 3,
        "EHLO": 5,
        "LHLO": 5,
        "VRFY": 1,
        "MAIL": 1000,
        "RCPT": 100_000,
        "DATA": 1000,
    }
)


class ConfigError(Exception):
    """The configuration is unusable; the message names the key and the reason."""


@dataclass(frozen=True)
class SmtpConfig:
    host: str = "127.0.0.1"
    port: int = 2525
    hostname: str = "support.example.org"
    protocol: str = "smtp"
    max_message_size: int = 26_214_400
    max_recipients: int = 100
    max_connections: int = 100
    max_connections_per_ip: int = 10
    timeout: int = 300
    # Used instead of `timeout` for new connections while more than 80 % of
    # max_connections are open (Postfix's stress mode).
    stress_timeout: int = 30
    tls_cert: str = ""
    tls_key: str = ""
    max_hops: int = 30
    max_rejected_recipients: int = 10
    max_messages_per_connection: int = 100
    # Concurrent DATA transfers + parses; each may hold a whole message in memory.
    data_slots: int = 8
    # How long a DATA command waits for a free slot before answering 451 4.3.2.
    data_slot_wait: int = 30
    smtputf8: bool = True
    command_limits: Mapping[str, int] = field(default_factory=lambda: DEFAULT_COMMAND_LIMITS)
    # The timeout model (RELIABILITY.md items 55-59). A client inside DATA must send at least
    # min_data_rate bytes/s on average once data_rate_grace seconds have passed, and never
    # go silent for data_stall_timeout seconds; else 421 4.4.2 and the slot is freed
    # (Postfix's smtpd_min_data_rate is 500 B/s).
    min_data_rate: int = 500
    data_rate_grace: float = 30.0
    data_stall_timeout: float = 60.0
    # DATA slots one client address (IPv6: one /64) may hold at once. 0 = a quarter of
    # data_slots, at least 1; otherwise less than data_slots (unless data_slots is 1).
    data_slots_per_ip: int = 0
    # Replies with a 4xx/5xx code one session may get before 421 4.7.0 and close.
    max_errors_per_session: int = 10
    # Replies (about one per command) one session may get before 421 4.7.0 and close.
    max_commands_per_session: int = 1000
    # Seconds a session may last in all; then 421 4.4.2 and close.
    max_session_time: float = 1800.0
    # Networks exempt from the per-address limits (max_connections_per_ip,
    # data_slots_per_ip), e.g. the front MTA that relays all mail: ["192.0.2.25/32"].
    per_ip_exempt: tuple[str, ...] = ()

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def data_slots_per_ip_effective(self) -> int:
        if self.data_slots_per_ip:
            return self.data_slots_per_ip
        return max(1, self.data_slots // 4)


@dataclass(frozen=True)
class StorageConfig:
    database: str = "var/gateway.db"
    busy_timeout_ms: int = 5000
    # Refuse new mail (452 4.3.1 at MAIL FROM) when the database's file system has less
    # free space than this. 0 means 1.5 x max_message_size x data_slots (Postfix's rule).
    min_free_space: int = 0
    # Retention (issue 13): the content (raw bytes, text, attachments) of messages older
    # than this many days is purged, their rows and events kept; 0 keeps everything.
    retain_messages_days: int = 0
    # Messages purged per write transaction, so a purge never holds intake up for long.
    retain_batch: int = 200

    # The search index of mail stored before it existed (issue 14) is built by the daemon
    # in batches of this many message ids, one batch per interval (seconds): each is one
    # bounded unit of the writer's group commit, so intake never waits behind it.
    search_backfill_batch: int = 500
    search_backfill_interval: float = 0.5


@dataclass(frozen=True)
class ParserConfig:
    workers: int = 2
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    wall_seconds: float = 15.0
    max_header_bytes: int = 100 * 1024
    max_header_fields: int = 1000
    max_field_bytes: int = 16 * 1024
    max_addresses: int = 100
    max_mime_depth: int = 20
    max_mime_parts: int = 200
    max_boundary_length: int = 2048


@dataclass(frozen=True)
class TicketsConfig:
    # The ticket tag in subjects; {number} is the ticket number.
    tag: str = "[#{number}]"


@dataclass(frozen=True)
class PolicyConfig:
    # What happens to mail from a sender nobody authorised: "quarantine" or "reject".
    unknown_sender: str = "quarantine"
    # Authentication-Results headers are trusted only from these authserv-ids (the front
    # MTA that checked DKIM/SPF/DMARC and strips such headers from incoming mail).
    trusted_authserv_ids: tuple[str, ...] = ()
    # Without an aligned DKIM or SPF pass, an authorised address counts as forged.
    require_authentication: bool = False
    # Verify DKIM signatures ourselves (dkimpy), with this minimum key size.
    verify_dkim: bool = False
    dkim_min_key_bits: int = 1024
    dns_timeout: float = 5.0
    # Held mail expires (with an audit event) after this many days.
    quarantine_days: int = 14
    # Where a refused sender is told to ask for access (in the 550 text), if set.
    contact: str = ""
    # Automatic mail per recipient, and the inbound rate that trips the loop rule.
    max_auto_replies_per_hour: int = 5
    max_auto_replies_per_day: int = 20
    loop_threshold_per_hour: int = 20
    # Notices to each admin per hour, capped per kind so that one kind cannot use up
    # another's: held mail, held mail that claims or imitates an identity
    # (unauthenticated, lookalike), and tripped loop rules.
    max_quarantine_notices_per_hour: int = 5
    max_security_notices_per_hour: int = 20
    max_loop_notices_per_hour: int = 5


@dataclass(frozen=True)
class StaffConfig:
    addresses: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    # Who is told about new quarantine entries and tripped loop rules.
    admins: tuple[str, ...] = ()
    # Put the staff member's name and address in replies to clients (else only the desk's).
    show_staff_address: bool = False
    # Mail from a staff address counts as staff only with an aligned DKIM or SPF pass (a
    # trusted upstream's Authentication-Results or our own DKIM check); without one it
    # is held as "unauthenticated". Anyone can write a staff address into From.
    require_authentication: bool = True


@dataclass(frozen=True)
class DeliveryConfig:
    # "directory": each outgoing mail is written as an .eml file (the out-of-the-box
    # default, no relay needed); "smtp": sent through the relay below.
    mode: str = "directory"
    directory: str = "var/outbox"
    relay_host: str = ""
    relay_port: int = 587
    # STARTTLS with certificate checks, never a plaintext fallback.
    starttls: bool = True
    # CA bundle for the relay's certificate ("" = the system's).
    ca_file: str = ""
    username: str = ""
    password_file: str = ""
    timeout: int = 60
    # Temporary failures are retried with back-off from retry_after seconds, doubling,
    # until give_up_after seconds after the mail was planned.
    retry_after: int = 300
    give_up_after: int = 86400
    # How often the worker looks for due mail when nothing woke it.
    poll_interval: float = 5.0


# The templates shipped with gateway: the project's top-level templates/ folder, which
# pyproject.toml packages as gateway.templates (gateway/templates in an installed wheel).
TEMPLATES_PACKAGE = "gateway.templates"


def _builtin_templates() -> Path:
    """Where importlib.resources finds the shipped templates: templates/ in a checkout or
    an editable install, site-packages/gateway/templates once the wheel is installed."""
    try:
        root = importlib.resources.files(TEMPLATES_PACKAGE)
    except ModuleNotFoundError:
        root = None
    if isinstance(root, Path):
        return root
    # Not a folder on disk (a broken install, or imported from a zip): the place a wheel
    # puts them, so that the error names what is missing.
    return Path(__file__).resolve().parent / "templates"


BUILTIN_TEMPLATES = _builtin_templates()

# systemd's StateDirectory= (the unit's /var/lib/gateway) as the service sees it; with
# several entries, a colon-separated list of absolute paths (systemd.exec(5)).
STATE_DIRECTORY_ENV = "STATE_DIRECTORY"
# The state keys: (section, key) -> the name under $STATE_DIRECTORY when the key is not
# in the file. A key given in the file is always used as given.
STATE_DEFAULTS: Mapping[tuple[str, str], str] = types.MappingProxyType(
    {("storage", "database"): "gateway.db", ("delivery", "directory"): "outbox"}
)


@dataclass(frozen=True)
class TemplatesConfig:
    # A folder of the admins' own templates; "" uses the ones shipped with gateway.
    directory: str = ""


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    # "auto": each line starts with its syslog priority <N> when stdout is the journal
    # ($JOURNAL_STREAM, sd-daemon(3)); "always" / "never" decide regardless.
    syslog_prefix: str = "auto"


@dataclass(frozen=True)
class MetricsConfig:
    # "host:port" ("[::1]:9464" for IPv6) of the Prometheus endpoint; "" = off.
    listen: str = ""
    # gateway status exits 1 when the oldest queued outbox row is older than this (s).
    stuck_after: int = 3600
    # How often (s) the daemon rewrites its status file and sends STATUS= to systemd.
    status_interval: int = 15


@dataclass(frozen=True)
class MailboxConfig:
    address: str
    unit: str = "support"
    # The desk's name in the From of our mail ("" = the unit's name, e.g. "Support").
    name: str = ""

    @property
    def desk(self) -> str:
        return self.name or self.unit.replace("-", " ").replace("_", " ").capitalize()

    @property
    def local_part(self) -> str:
        return self.address.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


@dataclass(frozen=True)
class CommitmentsConfig:
    # Business durations (gateway/businesstime.py: `30m`, `4h`, `2d`, `1h30m`). Each
    # [[unit]] may set its own; these are the defaults of every unit.
    # When a new ticket, or a client's reply that reopens one, is due an answer.
    first_response: str = "4h"
    # After each public staff update that states no promise of its own.
    update_every: str = "2d"
    # How long before a due time the reminder goes out.
    remind_before: str = "1h"
    # When an urgent ticket is due its first answer: wall-clock time, not business time
    # (an outage at 22:00 on a Saturday is not answered on Monday). `d` is 24 hours here.
    urgent_first_response: str = "30m"


_COMMITMENT_KEYS = ("first_response", "update_every", "remind_before", "urgent_first_response")


@dataclass(frozen=True)
class UrgencyConfig:
    # Words or phrases (not regexes) that make a client's mail urgent, on top of the
    # built-in outage and security phrases (gateway/urgency.py PHRASES).
    phrases: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpsetConfig:
    # Issue 12 item 5 (gateway/upset.py): extra complaint phrases, each weighing as much as
    # a built-in strong one ("unacceptable"), matched as plain words, case-insensitively.
    phrases: tuple[str, ...] = ()
    # The score (sum of the hits' weights) at which a client's mail marks its ticket upset.
    threshold: int = UPSET_DEFAULT_THRESHOLD


@dataclass(frozen=True)
class OncallConfig:
    # Issue 12 item 3. How long the person paged has to acknowledge (reply to the page,
    # `#take` the ticket or `gateway oncall ack`) before the next step is paged: the
    # unit's secondary, then its lead. Wall-clock time (`d` is 24 hours), like
    # urgent_first_response: nights and weekends are when pages happen.
    ack_within: str = "15m"
    # Paged when no one is on the rota, for a unit that names no `secondary` of its own.
    secondary: str = ""
    # Also POST each page as JSON here ("" = mail only): https, or http to loopback only.
    webhook: str = ""

    @property
    def ack_within_wall(self) -> timedelta:
        duration = businesstime.parse_duration(self.ack_within)
        return timedelta(days=duration.days, minutes=duration.minutes)


@dataclass(frozen=True)
class UnitConfig:
    """A desk unit: who works it, when it is open, and its commitments' durations."""

    # What [[mailbox]] unit and `orgs add --unit` name.
    name: str
    # Its support developers; they count as staff (Config.is_staff).
    staff: tuple[str, ...] = ()
    # Where escalations of missed promises go ("" = none: the owner only); also the last
    # step of an unacknowledged page.
    lead: str = ""
    # Paged when no one is on the rota, or when the first page is not acknowledged within
    # [oncall] ack_within ("" = [oncall] secondary).
    secondary: str = ""
    timezone: str = businesstime.DEFAULT_TIMEZONE
    # Business days: "mon".."sun" or "monday".."sunday", any case; normalised to the
    # three-letter names in weekday order.
    days: tuple[str, ...] = businesstime.DEFAULT_DAYS
    # Opening hours, local wall-clock HH:MM; end may be "24:00" and is after start.
    start: str = businesstime.DEFAULT_START
    end: str = businesstime.DEFAULT_END
    # Extra closed dates (YYYY-MM-DD) on top of the public holidays.
    holidays: tuple[str, ...] = ()
    # Public holidays from the `holidays` package ("" = none). The subdivision defaults
    # to ENG for GB and to "" (national holidays) when the unit names another country.
    holidays_country: str = businesstime.DEFAULT_HOLIDAYS_COUNTRY
    holidays_subdivision: str = businesstime.DEFAULT_HOLIDAYS_SUBDIVISION
    # As in [commitments], whose values are the defaults.
    first_response: str = CommitmentsConfig.first_response
    update_every: str = CommitmentsConfig.update_every
    remind_before: str = CommitmentsConfig.remind_before
    urgent_first_response: str = CommitmentsConfig.urgent_first_response

    @functools.cached_property
    def hours(self) -> BusinessHours:
        """Its business hours (built once: the holiday table fills in as it is used)."""
        return BusinessHours.build(
            timezone=self.timezone,
            days=self.days,
            start=self.start,
            end=self.end,
            holidays=self.holidays,
            holidays_country=self.holidays_country,
            holidays_subdivision=self.holidays_subdivision,
        )

    @property
    def first_response_duration(self) -> Duration:
        return businesstime.parse_duration(self.first_response)

    @property
    def update_every_duration(self) -> Duration:
        return businesstime.parse_duration(self.update_every)

    @property
    def remind_before_duration(self) -> Duration:
        return businesstime.parse_duration(self.remind_before)

    @property
    def urgent_first_response_wall(self) -> timedelta:
        """urgent_first_response as wall-clock time (a day is 24 hours)."""
        duration = businesstime.parse_duration(self.urgent_first_response)
        return timedelta(days=duration.days, minutes=duration.minutes)


@dataclass(frozen=True)
class Config:
    path: Path
    smtp: SmtpConfig
    storage: StorageConfig
    parser: ParserConfig
    log: LogConfig
    mailboxes: tuple[MailboxConfig, ...]
    tickets: TicketsConfig = field(default_factory=TicketsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    staff: StaffConfig = field(default_factory=StaffConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    commitments: CommitmentsConfig = field(default_factory=CommitmentsConfig)
    urgency: UrgencyConfig = field(default_factory=UrgencyConfig)
    upset: UpsetConfig = field(default_factory=UpsetConfig)
    oncall: OncallConfig = field(default_factory=OncallConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # Every unit the desk knows: the [[unit]] tables in their order, then one with the
    # defaults for each mailbox unit that has no table.
    units: tuple[UnitConfig, ...] = ()

    def is_staff(self, address: str | None) -> bool:
        """Staff by configured address or domain, or a unit's staff (address already
        normalised). A unit's lead is not staff by being lead."""
        if not address:
            return False
        return (
            address in self.staff.addresses
            or address.rpartition("@")[2] in self.staff.domains
            or any(address in unit.staff for unit in self.units)
        )

    def unit(self, name: str) -> UnitConfig:
        """The unit called `name`; one nobody configured (a ticket's unit since removed
        from the file) gets the defaults, as a mailbox's unit without a table does."""
        for unit in self.units:
            if unit.name == name:
                return unit
        return _default_unit(name, self.commitments)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, value: str) -> Path:
        """A path from the config, relative ones taken against the config file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    @property
    def database_path(self) -> Path:
        return self.resolve(self.storage.database)

    @property
    def templates_path(self) -> Path:
        if not self.templates.directory:
            return BUILTIN_TEMPLATES
        return self.resolve(self.templates.directory)

    @property
    def status_path(self) -> Path:
        """The daemon's status file (pid, start, last commit), beside the database."""
        return self.database_path.with_name(self.database_path.name + ".status.json")

    @property
    def outbox_path(self) -> Path:
        return self.resolve(self.delivery.directory)

    @property
    def min_free_space(self) -> int:
        if self.storage.min_free_space:
            return self.storage.min_free_space
        return int(1.5 * self.smtp.max_message_size * self.smtp.data_slots)


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but unsafe: check-config prints them, the daemon logs them."""
    warnings: list[str] = []
    staff = config.staff
    has_staff = bool(staff.addresses or staff.domains or any(u.staff for u in config.units))
    if not staff.require_authentication:
        warnings.append(
            "staff.require_authentication is false: anyone who writes a staff address "
            "into From and a ticket's reply token or one of our Message-IDs into the mail "
            "speaks as staff, and the text is mailed to the client"
        )
    elif has_staff and not (config.policy.trusted_authserv_ids or config.policy.verify_dkim):
        warnings.append(
            "staff.require_authentication is on but neither policy.trusted_authserv_ids "
            "nor policy.verify_dkim is set: nothing can authenticate staff mail, so every "
            "mail from a staff address will be held as unauthenticated"
        )
    # Issue 12: whoever is paged acknowledges as staff (a reply to the page, #take).
    secondaries = [("oncall.secondary", config.oncall.secondary)] + [
        (f"unit {u.name!r} secondary", u.secondary) for u in config.units
    ]
    for key, address in secondaries:
        if address and not config.is_staff(address):
            warnings.append(
                f"{key} {address} is not a staff address: it is paged, but cannot "
                "acknowledge a page by mail (only `gateway oncall ack` would)"
            )
    return warnings


def config_path(explicit: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """--config, else $GATEWAY_CONFIG, else ./config.toml."""
    chosen = explicit or environ.get(CONFIG_ENV) or DEFAULT_CONFIG_NAME
    return Path(chosen).expanduser().absolute()


def load_config(path: Path) -> Config:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path)


_SECTIONS = {
    "smtp",
    "storage",
    "parser",
    "log",
    "mailbox",
    "tickets",
    "policy",
    "staff",
    "delivery",
    "templates",
    "commitments",
    "unit",
    "urgency",
    "upset",
    "oncall",
    "metrics",
}


def state_directory(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The first entry of $STATE_DIRECTORY, or None when it is not set."""
    value = environ.get(STATE_DIRECTORY_ENV, "")
    if not value:
        return None
    first = Path(value.split(":")[0])
    if not first.is_absolute():
        raise ConfigError(f"{STATE_DIRECTORY_ENV}: must be an absolute path, got {value!r}")
    return first


def _state_defaults(data: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """`data` with each state key the file leaves out set under $STATE_DIRECTORY."""
    state = state_directory(environ)
    if state is None:
        return dict(data)
    merged = dict(data)
    for (section, key), name in STATE_DEFAULTS.items():
        table = data.get(section, {})
        if isinstance(table, dict) and key not in table:
            merged[section] = {**merged.get(section, {}), key: str(state / name)}
    return merged


def parse_config(
    data: Mapping[str, Any], path: Path, environ: Mapping[str, str] = os.environ
) -> Config:
    data = _state_defaults(data, environ)
    unknown = sorted(set(data) - _SECTIONS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (expected one of {sorted(_SECTIONS)})")
    smtp = _build(SmtpConfig, _table(data, "smtp"), "smtp")
    storage = _build(StorageConfig, _table(data, "storage"), "storage")
    parser = _build(ParserConfig, _table(data, "parser"), "parser")
    log = _build(LogConfig, _table(data, "log"), "log")
    tickets = _build(TicketsConfig, _table(data, "tickets"), "tickets")
    policy = _build(PolicyConfig, _table(data, "policy"), "policy")
    staff = _build(StaffConfig, _table(data, "staff"), "staff")
    delivery = _build(DeliveryConfig, _table(data, "delivery"), "delivery")
    templates = _build(TemplatesConfig, _table(data, "templates"), "templates")
    raw_boxes = data.get("mailbox", [])
    if not isinstance(raw_boxes, list) or not all(isinstance(b, dict) for b in raw_boxes):
        raise ConfigError("mailbox: must be an array of tables ([[mailbox]])")
    mailboxes = tuple(
        _build(MailboxConfig, box, f"mailbox[{i}]") for i, box in enumerate(raw_boxes)
    )
    commitments = _build(CommitmentsConfig, _table(data, "commitments"), "commitments")
    for key in _COMMITMENT_KEYS:
        _check_duration(getattr(commitments, key), f"commitments.{key}")
    raw_units = data.get("unit", [])
    if not isinstance(raw_units, list) or not all(isinstance(u, dict) for u in raw_units):
        raise ConfigError("unit: must be an array of tables ([[unit]])")
    units = tuple(_build_unit(unit, i, commitments) for i, unit in enumerate(raw_units))
    urgency = _build(UrgencyConfig, _table(data, "urgency"), "urgency")
    for i, phrase in enumerate(urgency.phrases):
        if not phrase.strip():
            raise ConfigError(f"urgency.phrases[{i}]: must not be blank")
    upset = _build(UpsetConfig, _table(data, "upset"), "upset")
    if upset.threshold < 1:
        raise ConfigError(f"upset.threshold: must be at least 1, got {upset.threshold}")
    for i, phrase in enumerate(upset.phrases):
        if not phrase.split():
            raise ConfigError(f"upset.phrases[{i}]: must not be empty")
    oncall = _build(OncallConfig, _table(data, "oncall"), "oncall")
    metrics = _build(MetricsConfig, _table(data, "metrics"), "metrics")
    if metrics.listen:
        parse_listen(metrics.listen, "metrics.listen")
    for key in ("stuck_after", "status_interval"):
        if getattr(metrics, key) < 1:
            raise ConfigError(f"metrics.{key}: must be at least 1, got {getattr(metrics, key)}")
    oncall = dataclasses.replace(
        oncall,
        ack_within=_check_duration(oncall.ack_within, "oncall.ack_within"),
        secondary=normalise_mailbox(oncall.secondary, "oncall.secondary", allow_plus=True)
        if oncall.secondary
        else "",
        webhook=_check_webhook(oncall.webhook, "oncall.webhook"),
    )
    config = Config(
        path=path,
        smtp=smtp,
        storage=storage,
        parser=parser,
        log=log,
        mailboxes=mailboxes,
        tickets=tickets,
        policy=policy,
        staff=staff,
        delivery=delivery,
        templates=templates,
        commitments=commitments,
        urgency=urgency,
        units=units,
        upset=upset,
        oncall=oncall,
        metrics=metrics,
    )
    _validate(config)
    return config


def parse_listen(value: str, key: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" to (host, port); a ConfigError naming `key` otherwise."""
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            host = ""
    elif ":" in host:
        host = ""  # an IPv6 address must be bracketed, or the port is ambiguous
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not host or not 0 <= port <= 65535 or any(c.isspace() for c in host):
        raise ConfigError(
            f'{key}: must be "host:port" (IPv6 as "[::1]:9464"), port 0 to 65535, got {value!r}'
        )
    return host, port


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a table ([{name}])")
    return value


def _build(cls: type[_T], table: Mapping[str, Any], prefix: str) -> _T:
    """Build dataclass `cls` from a TOML table, type-checking every key."""
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown key (expected one of {sorted(fields)})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key}: required")
            continue
        values[name] = _coerce(table[name], hints[name], key, f.default_factory)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, default_factory: Any) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings, got {value!r}")
        return tuple(value)
    if typing.get_origin(hint) is Mapping:
        # A partial table of integers merged over the defaults, e.g. command limits.
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a table, got {value!r}")
        merged = dict(default_factory())
        for sub, number in value.items():
            name = sub.upper()
            if name not in merged:
                raise ConfigError(f"{key}.{sub}: unknown name (expected one of {sorted(merged)})")
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ConfigError(f"{key}.{sub}: must be a positive integer, got {number!r}")
            merged[name] = number
        return types.MappingProxyType(merged)
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # a bug in this module


def _validate(config: Config) -> None:
    smtp = config.smtp
    if not 0 <= smtp.port <= 65535:
        raise ConfigError(f"smtp.port: must be between 0 and 65535, got {smtp.port}")
    if smtp.protocol not in ("smtp", "lmtp"):
        raise ConfigError(f'smtp.protocol: must be "smtp" or "lmtp", got {smtp.protocol!r}')
    if not smtp.hostname or any(c.isspace() for c in smtp.hostname):
        raise ConfigError("smtp.hostname: must be a host name without spaces")
    positive = {
        "smtp.max_message_size": smtp.max_message_size,
        "smtp.max_recipients": smtp.max_recipients,
        "smtp.max_connections": smtp.max_connections,
        "smtp.max_connections_per_ip": smtp.max_connections_per_ip,
        "smtp.timeout": smtp.timeout,
        "smtp.stress_timeout": smtp.stress_timeout,
        "smtp.max_hops": smtp.max_hops,
        "smtp.max_rejected_recipients": smtp.max_rejected_recipients,
        "smtp.max_messages_per_connection": smtp.max_messages_per_connection,
        "smtp.data_slots": smtp.data_slots,
        "smtp.data_slot_wait": smtp.data_slot_wait,
        "smtp.min_data_rate": smtp.min_data_rate,
        "smtp.max_errors_per_session": smtp.max_errors_per_session,
        "smtp.max_commands_per_session": smtp.max_commands_per_session,
        "storage.busy_timeout_ms": config.storage.busy_timeout_ms,
        "storage.retain_batch": config.storage.retain_batch,
        "storage.search_backfill_batch": config.storage.search_backfill_batch,
        "parser.workers": config.parser.workers,
        "parser.cpu_seconds": config.parser.cpu_seconds,
        "parser.memory_bytes": config.parser.memory_bytes,
        "parser.max_header_bytes": config.parser.max_header_bytes,
        "parser.max_header_fields": config.parser.max_header_fields,
        "parser.max_field_bytes": config.parser.max_field_bytes,
        "parser.max_addresses": config.parser.max_addresses,
        "parser.max_mime_depth": config.parser.max_mime_depth,
        "parser.max_mime_parts": config.parser.max_mime_parts,
        "parser.max_boundary_length": config.parser.max_boundary_length,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    if config.parser.wall_seconds <= 0:
        raise ConfigError("parser.wall_seconds: must be more than 0")
    if config.storage.search_backfill_interval <= 0:
        raise ConfigError("storage.search_backfill_interval: must be more than 0")
    if config.storage.min_free_space < 0:
        raise ConfigError("storage.min_free_space: must be 0 (automatic) or more")
    if config.storage.retain_messages_days < 0:
        raise ConfigError("storage.retain_messages_days: must be 0 (keep) or more")
    _validate_timeout_model(smtp)
    if smtp.max_connections_per_ip > smtp.max_connections:
        raise ConfigError("smtp.max_connections_per_ip: must not exceed smtp.max_connections")
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        raise ConfigError("smtp.tls_cert: tls_cert and tls_key must be set together")
    for key in ("tls_cert", "tls_key"):
        value = getattr(smtp, key)
        if value and not config.resolve(value).is_file():
            raise ConfigError(f"smtp.{key}: no such file: {config.resolve(value)}")
    if config.log.syslog_prefix not in ("auto", "always", "never"):
        raise ConfigError(
            'log.syslog_prefix: must be "auto", "always" or "never", '
            f"got {config.log.syslog_prefix!r}"
        )
    if config.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f'log.level: must be "debug", "info", "warning" or "error", got {config.log.level!r}'
        )
    tag = config.tickets.tag
    if tag.count("{number}") != 1 or not tag.replace("{number}", "").strip():
        raise ConfigError(
            f"tickets.tag: must contain {{number}} exactly once and some text around it, "
            f"got {tag!r}"
        )
    if any(c in tag for c in "\r\n\x00"):
        raise ConfigError("tickets.tag: must be one line")
    policy = config.policy
    if policy.unknown_sender not in ("quarantine", "reject"):
        raise ConfigError(
            'policy.unknown_sender: must be "quarantine" or "reject", '
            f"got {policy.unknown_sender!r}"
        )
    for key in (
        "dkim_min_key_bits",
        "quarantine_days",
        "max_auto_replies_per_hour",
        "max_auto_replies_per_day",
        "loop_threshold_per_hour",
        "max_quarantine_notices_per_hour",
        "max_security_notices_per_hour",
        "max_loop_notices_per_hour",
    ):
        if getattr(policy, key) < 1:
            raise ConfigError(f"policy.{key}: must be at least 1, got {getattr(policy, key)}")
    if policy.dns_timeout <= 0:
        raise ConfigError("policy.dns_timeout: must be more than 0")
    if any(c in policy.contact for c in "\r\n\x00") or not policy.contact.isascii():
        raise ConfigError("policy.contact: must be one line of ASCII (it is sent in SMTP replies)")
    staff_addresses = tuple(
        normalise_mailbox(a, f"staff.addresses[{i}]", allow_plus=True)
        for i, a in enumerate(config.staff.addresses)
    )
    staff_domains = tuple(
        normalise_mailbox(f"x@{d}", f"staff.domains[{i}]").partition("@")[2]
        for i, d in enumerate(config.staff.domains)
    )
    staff_admins = tuple(
        normalise_mailbox(a, f"staff.admins[{i}]", allow_plus=True)
        for i, a in enumerate(config.staff.admins)
    )
    object.__setattr__(
        config,
        "staff",
        dataclasses.replace(
            config.staff, addresses=staff_addresses, domains=staff_domains, admins=staff_admins
        ),
    )
    _validate_delivery(config)
    if not config.storage.database:
        raise ConfigError("storage.database: must not be empty")
    if not config.mailboxes:
        raise ConfigError("mailbox: at least one [[mailbox]] with an address is required")
    seen: set[str] = set()
    normalised = []
    for i, box in enumerate(config.mailboxes):
        address = normalise_mailbox(box.address, f"mailbox[{i}].address")
        if address in seen:
            raise ConfigError(f"mailbox[{i}].address: {box.address} is configured twice")
        seen.add(address)
        if not box.unit.strip():
            raise ConfigError(f"mailbox[{i}].unit: must not be empty")
        normalised.append(dataclasses.replace(box, address=address))
    object.__setattr__(config, "mailboxes", tuple(normalised))
    _validate_units(config)


def _default_unit(name: str, commitments: CommitmentsConfig) -> UnitConfig:
    return UnitConfig(
        name=name,
        first_response=commitments.first_response,
        update_every=commitments.update_every,
        remind_before=commitments.remind_before,
        urgent_first_response=commitments.urgent_first_response,
    )


def _build_unit(table: Mapping[str, Any], index: int, commitments: CommitmentsConfig) -> UnitConfig:
    """A [[unit]] table over the [commitments] defaults (checked already)."""
    merged = {key: getattr(commitments, key) for key in _COMMITMENT_KEYS} | dict(table)
    country = table.get("holidays_country")
    if "holidays_subdivision" not in table and isinstance(country, str):
        # England's subdivision belongs to GB only: a unit in another country gets that
        # country's national holidays unless it names a subdivision.
        merged["holidays_subdivision"] = businesstime.default_subdivision(country.upper())
    return _build(UnitConfig, merged, f"unit[{index}]")


def _check_webhook(url: str, key: str) -> str:
    """A page webhook: https anywhere, or plain http to a loopback address only (a page
    names a client and an incident; it does not cross a network in clear)."""
    if not url:
        return ""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    if parsed.scheme == "https" and host:
        return url
    if parsed.scheme == "http" and host:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            return url
        raise ConfigError(f"{key}: plain http is allowed to loopback only, got {url!r}")
    raise ConfigError(f"{key}: must be an https:// URL (or http:// to loopback), got {url!r}")


def _check_duration(value: str, key: str) -> str:
    try:
        return str(businesstime.parse_duration(value))
    except BusinessTimeError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _validate_units(config: Config) -> None:
    """Check and normalise the [[unit]] tables, then add a default unit for each mailbox
    unit without one."""
    units: list[UnitConfig] = []
    seen: set[str] = set()
    for i, unit in enumerate(config.units):
        units.append(_validate_unit(unit, f"unit[{i}]"))
        if unit.name in seen:
            raise ConfigError(f"unit[{i}].name: unit {unit.name!r} is configured twice")
        seen.add(unit.name)
    for box in config.mailboxes:
        if box.unit not in seen:
            seen.add(box.unit)
            units.append(_default_unit(box.unit, config.commitments))
    object.__setattr__(config, "units", tuple(units))


def _validate_unit(unit: UnitConfig, prefix: str) -> UnitConfig:
    """One [[unit]] table, checked key by key and normalised."""

    def check(key: str, parse: typing.Callable[..., _T], *args: Any) -> _T:
        try:
            return parse(*args)
        except BusinessTimeError as exc:
            raise ConfigError(f"{prefix}.{key}: {exc}") from None

    if not unit.name.strip():
        raise ConfigError(f"{prefix}.name: must not be empty")
    staff = tuple(
        normalise_mailbox(a, f"{prefix}.staff[{i}]", allow_plus=True)
        for i, a in enumerate(unit.staff)
    )
    lead = normalise_mailbox(unit.lead, f"{prefix}.lead", allow_plus=True) if unit.lead else ""
    secondary = (
        normalise_mailbox(unit.secondary, f"{prefix}.secondary", allow_plus=True)
        if unit.secondary
        else ""
    )
    check("timezone", businesstime.parse_timezone, unit.timezone)
    if not unit.days:
        raise ConfigError(f"{prefix}.days: at least one day is needed")
    weekdays: list[int] = []
    for i, name in enumerate(unit.days):
        weekday = check(f"days[{i}]", businesstime.parse_day, name)
        if weekday in weekdays:
            day = businesstime.DAY_NAMES[weekday]
            raise ConfigError(f"{prefix}.days[{i}]: {name!r} names {day} twice")
        weekdays.append(weekday)
    start = check("start", businesstime.parse_clock, unit.start)
    end = check(
        "end", functools.partial(businesstime.parse_clock, allow_midnight_end=True), unit.end
    )
    if end <= start:
        raise ConfigError(f"{prefix}.end: must be later than start ({unit.start}), got {unit.end}")
    holidays = tuple(
        check(f"holidays[{i}]", businesstime.parse_date, d).isoformat()
        for i, d in enumerate(unit.holidays)
    )
    country = check("holidays_country", businesstime.check_holidays_country, unit.holidays_country)
    subdivision = check(
        "holidays_subdivision",
        businesstime.check_holidays_subdivision,
        unit.holidays_country,
        unit.holidays_subdivision,
    )
    durations = {
        key: _check_duration(getattr(unit, key), f"{prefix}.{key}") for key in _COMMITMENT_KEYS
    }
    return dataclasses.replace(
        unit,
        staff=staff,
        lead=lead,
        secondary=secondary,
        days=tuple(businesstime.DAY_NAMES[d] for d in sorted(weekdays)),
        holidays=holidays,
        holidays_country=country,
        holidays_subdivision=subdivision,
        **durations,
    )


def _validate_timeout_model(smtp: SmtpConfig) -> None:
    for key in ("data_stall_timeout", "max_session_time"):
        if getattr(smtp, key) <= 0:
            raise ConfigError(f"smtp.{key}: must be more than 0, got {getattr(smtp, key)}")
    if smtp.data_rate_grace < 0:
        raise ConfigError(f"smtp.data_rate_grace: must be 0 or more, got {smtp.data_rate_grace}")
    per_ip = smtp.data_slots_per_ip
    if per_ip < 0:
        raise ConfigError(f"smtp.data_slots_per_ip: must be 0 (automatic) or more, got {per_ip}")
    if per_ip and per_ip >= smtp.data_slots and not per_ip == smtp.data_slots == 1:
        raise ConfigError(
            f"smtp.data_slots_per_ip: must be less than smtp.data_slots ({smtp.data_slots}), "
            f"so one client can never hold every slot; got {per_ip}"
        )
    for i, network in enumerate(smtp.per_ip_exempt):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"smtp.per_ip_exempt[{i}]: not an IP network: {network!r}") from None


def _validate_delivery(config: Config) -> None:
    delivery = config.delivery
    if delivery.mode not in ("directory", "smtp"):
        raise ConfigError(f'delivery.mode: must be "directory" or "smtp", got {delivery.mode!r}')
    if delivery.mode == "directory" and not delivery.directory:
        raise ConfigError("delivery.directory: must be set when delivery.mode is directory")
    if delivery.mode == "smtp" and not delivery.relay_host:
        raise ConfigError("delivery.relay_host: must be set when delivery.mode is smtp")
    if not 1 <= delivery.relay_port <= 65535:
        raise ConfigError(f"delivery.relay_port: must be 1 to 65535, got {delivery.relay_port}")
    for key in ("timeout", "retry_after", "give_up_after"):
        if getattr(delivery, key) < 1:
            raise ConfigError(f"delivery.{key}: must be at least 1, got {getattr(delivery, key)}")
    if delivery.poll_interval <= 0:
        raise ConfigError("delivery.poll_interval: must be more than 0")
    if bool(delivery.username) != bool(delivery.password_file):
        raise ConfigError("delivery.username: username and password_file must be set together")
    for key in ("password_file", "ca_file"):
        value = getattr(delivery, key)
        if value and not config.resolve(value).is_file():
            raise ConfigError(f"delivery.{key}: no such file: {config.resolve(value)}")
    if delivery.username and not delivery.starttls:
        raise ConfigError("delivery.starttls: a password is never sent without TLS")
    if not config.templates.directory and not BUILTIN_TEMPLATES.is_dir():
        raise ConfigError(
            f"templates.directory: not set, and the templates shipped with gateway are "
            f"missing ({BUILTIN_TEMPLATES}): reinstall gateway, or set templates.directory"
        )
    if not config.templates_path.is_dir():
        raise ConfigError(f"templates.directory: no such folder: {config.templates_path}")


def check_writable(config: Config) -> None:
    """Every folder the daemon writes must be writable by this process: ConfigError naming
    the first key that is not (check-config, and serve before it opens or binds anything).

    A missing folder is created at start, so its nearest existing parent must be writable.
    os.access also sees a read-only mount (EROFS), as systemd's ProtectSystem=strict makes
    /etc; for root it is otherwise always true.
    """
    folders = [("storage.database", config.database_path.parent)]
    if config.delivery.mode == "directory":
        folders.append(("delivery.directory", config.outbox_path))
    for key, folder in folders:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"{key}: {existing} is not a folder (for {folder})")
        if not os.access(existing, os.W_OK | os.X_OK):
            what = "" if existing == folder else f" (to create {folder})"
            raise ConfigError(
                f"{key}: cannot write to {existing}{what}: set {key} to a writable place, "
                f"or run under systemd with StateDirectory= (${STATE_DIRECTORY_ENV})"
            )
    # SQLite writes the file and its -wal and -shm beside it; one made by root (an admin
    # command run as root) locks the service user out.
    database = config.database_path
    for file in (database, database.with_name(database.name + "-wal")):
        if file.exists() and not os.access(file, os.R_OK | os.W_OK):
            raise ConfigError(f"storage.database: cannot write to {file}")


def normalise_mailbox(address: str, key: str, allow_plus: bool = False) -> str:
    """A configured address: valid, lower-cased; a mailbox has no plus tag."""
    try:
        valid = validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ConfigError(f"{key}: not a valid address: {exc}") from None
    if "+" in valid.local_part and not allow_plus:
        raise ConfigError(f"{key}: must not contain '+' (plus tags are accepted automatically)")
    return f"{valid.local_part.lower()}@{valid.ascii_domain.lower()}"
