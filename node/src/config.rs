//! The daemon's settings, layered: built-in defaults, then the config file in
//! the data directory (`config.toml`), then environment variables, then
//! command-line flags; a later layer wins.
//!
//! Each setting is declared once, as a field of [`Overrides`]: that type is
//! both the flags (and `FOGMESH_*` variables) of `fogmesh run`, through clap,
//! and the content of `config.toml`, through serde. Every field is optional:
//! [`Settings::resolve`] merges the two layers and fills what neither says
//! with the defaults, which come from the node's own config types
//! ([`BehaviourConfig`], [`GroupsConfig`]) or from the constants below. The
//! help text shows a default by formatting that same value.

use std::fmt::Display;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::builder::{FalseyValueParser, TypedValueParser as _};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::Deserialize;

use crate::behaviour::{BehaviourConfig, KadMode};
use crate::groups::GroupsConfig;

/// The config file's name inside the data directory.
pub const CONFIG_FILE: &str = "config.toml";

/// The default TCP (and UDP, for QUIC) port the node listens on.
pub const DEFAULT_P2P_PORT: u16 = 7373;
/// The default loopback port of the local API.
pub const DEFAULT_API_PORT: u16 = 7374;
/// The default address of the local API.
pub const DEFAULT_API_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, DEFAULT_API_PORT));
/// Below this many connected peers, by default, discovered peers are
/// dialled.
pub const DEFAULT_MIN_PEERS: usize = 8;
/// How long, by default, a connection with no open stream is kept.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a direct message waits for its receipt on the internet route.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an undelivered direct message is kept: 7 days.
pub const DEFAULT_MESSAGE_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a reservation on a relay server lasts (relay v2's default).
pub const DEFAULT_RELAY_RESERVATION: Duration = Duration::from_secs(3600);
/// Bytes held for others as a mailbox holder, by default.
pub const DEFAULT_MAILBOX_QUOTA: u64 = 64 * 1024 * 1024;
/// How long a direct message waits for its recipient before it is
/// deposited with mailbox holders, by default.
pub const DEFAULT_MAILBOX_AFTER: Duration = Duration::from_secs(30);
/// Default of `--mailbox-recheck-secs`.
pub const DEFAULT_MAILBOX_RECHECK: Duration = crate::mailbox::DEFAULT_RECHECK;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The name clap accepts, which is also the config file's.
        match clap::ValueEnum::to_possible_value(self) {
            Some(v) => f.write_str(v.get_name()),
            None => Ok(()),
        }
    }
}

/// The settings of a running daemon, after all layers are merged.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where identity, database and API files live.
    pub data_dir: PathBuf,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (each ends with `/p2p/<id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Address of the local HTTP API (loopback).
    pub api: SocketAddr,
    /// Whether mDNS discovery runs.
    pub mdns: bool,
    /// Whether TCP dials leave from the listening port.
    pub tcp_port_reuse: bool,
    /// Address to serve Prometheus metrics on, if any.
    pub metrics: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Established connections allowed in total.
    pub max_connections: u32,
    /// Below this many connected peers, the node dials peers it discovers.
    pub min_peers: usize,
    /// How long a connection with no open stream is kept.
    pub idle_timeout: Duration,
    /// Gossiped group messages per second accepted from one sender.
    pub group_rate: f64,
    /// How long a direct message waits for its receipt on the internet
    /// route before the next route is tried (BLE gets three times as long).
    pub message_timeout: Duration,
    /// How long an undelivered direct message is kept and retried.
    pub message_lifetime: Duration,
    /// Admins whose group invitations are accepted without asking.
    pub trust: Vec<libp2p::PeerId>,
    /// File upload limit, bytes per second.
    pub max_upload_rate: Option<u64>,
    /// File download limit, bytes per second.
    pub max_download_rate: Option<u64>,
    /// Where to write the NDJSON event log, if anywhere.
    pub event_log: Option<PathBuf>,
    /// The BLE radio, when BLE is on.
    pub ble: Option<BleRadio>,
    /// Where this node stands on a simulated medium.
    pub ble_position: fogmesh_ble::sim::Position,
    /// Whether the IP transports (TCP, QUIC) are on.
    pub internet: bool,
    /// Circuit relays to reserve a slot on (each ends with `/p2p/<id>`).
    pub relays: Vec<Multiaddr>,
    /// Offer circuit relaying once AutoNAT finds the node public.
    pub relay_server: bool,
    /// Kademlia's mode.
    pub kad_mode: KadMode,
    /// AutoNAT judges private addresses too (test topologies, LANs).
    pub autonat_private_addrs: bool,
    /// How long a reservation on this node's relay server lasts.
    pub relay_reservation: Duration,
    /// Hold sealed messages for others (`--no-mailbox` turns it off).
    pub mailbox: bool,
    /// Bytes held for others at most.
    pub mailbox_quota: u64,
    /// How long a message waits for its recipient before it is deposited
    /// with mailbox holders; `None`: never.
    pub mailbox_after: Option<Duration>,
    /// How often deposits and held envelopes are re-checked against the
    /// peers closest to their keys.
    pub mailbox_recheck: Duration,
    /// The onion route: mix relaying, hops, delays, cover traffic.
    pub onion: crate::onion::OnionConfig,
}

/// Which BLE radio `--ble` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BleRadio {
    /// A simulated medium served by `fogmesh radio serve` on this socket.
    Sim(PathBuf),
    /// A BlueZ adapter, such as `hci0`.
    Adapter(String),
}

/// What the command line, the environment or the config file says about
/// each daemon setting; `None` where it says nothing.
///
/// A field's config key is its name; its flag is `--` and the name with
/// dashes, except for the switches `mdns` and `internet`, which are turned
/// off with `--no-mdns` and `--no-internet`. Unknown config keys are an
/// error, so that a typo does not go unnoticed. A config value is parsed by
/// the same function as its flag. Fields without a doc comment state their
/// help (with the default) in their `help` attribute.
#[derive(Debug, Default, Clone, clap::Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Overrides {
    #[arg(
        long = "listen",
        value_name = "MULTIADDR",
        env = "FOGMESH_LISTEN",
        value_delimiter = ',',
        help = with_default(
            "Address to listen on (repeatable; port 0 picks a free port)",
            default_listen().iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
        )
    )]
    #[serde(deserialize_with = "from_str::listen")]
    pub(crate) listen: Option<Vec<Multiaddr>>,
    /// Peer to dial at start, ending with /p2p/<peer id> (repeatable).
    #[arg(
        long = "bootstrap",
        value_name = "MULTIADDR",
        env = "FOGMESH_BOOTSTRAP",
        value_delimiter = ',',
        value_parser = parse_bootstrap
    )]
    #[serde(deserialize_with = "from_str::bootstrap")]
    pub(crate) bootstrap: Option<Vec<Multiaddr>>,
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "FOGMESH_API",
        help = with_default("Address of the local API; must be loopback", DEFAULT_API_ADDR)
    )]
    pub(crate) api: Option<SocketAddr>,
    /// Turn LAN discovery (mDNS) off.
    #[arg(
        long = "no-mdns",
        env = "FOGMESH_NO_MDNS",
        num_args = 0,
        default_missing_value = "true",
        value_parser = switched_off()
    )]
    pub(crate) mdns: Option<bool>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT", env = "FOGMESH_METRICS")]
    pub(crate) metrics: Option<SocketAddr>,
    /// Dial TCP from the listening port (true, the default: one address
    /// per node, and hole punching needs it) or from a new port per dial
    /// (false: for networks without SO_REUSEPORT, such as Shadow's).
    #[arg(long, value_name = "BOOL", env = "FOGMESH_TCP_PORT_REUSE")]
    pub(crate) tcp_port_reuse: Option<bool>,
    #[arg(
        long,
        value_name = "FORMAT",
        env = "FOGMESH_LOG_FORMAT",
        help = with_default(
            "Log format on stderr (the filter comes from RUST_LOG, default info)",
            LogFormat::default(),
        )
    )]
    pub(crate) log_format: Option<LogFormat>,
    #[arg(
        long,
        value_name = "N",
        help = with_default(
            "Established connections allowed in total",
            BehaviourConfig::default().max_connections,
        )
    )]
    pub(crate) max_connections: Option<u32>,
    #[arg(
        long,
        value_name = "N",
        help = with_default(
            "Below this many connected peers, discovered peers are dialled",
            DEFAULT_MIN_PEERS,
        )
    )]
    pub(crate) min_peers: Option<usize>,
    #[arg(
        long,
        value_name = "SECS",
        help = with_default(
            "Seconds a connection with no open stream is kept",
            DEFAULT_IDLE_TIMEOUT.as_secs(),
        )
    )]
    pub(crate) idle_timeout_secs: Option<u64>,
    #[arg(
        long,
        value_name = "MSGS",
        help = with_default(
            "Gossiped group messages per second accepted from one sender (bursts of four times as many)",
            GroupsConfig::default().sender_rate,
        )
    )]
    pub(crate) group_rate: Option<f64>,
    #[arg(
        long,
        value_name = "SECS",
        help = with_default(
            "Seconds a direct message waits for its receipt on the internet before the next route is tried (BLE: three times as long)",
            DEFAULT_MESSAGE_TIMEOUT.as_secs(),
        )
    )]
    pub(crate) message_timeout_secs: Option<u64>,
    #[arg(
        long,
        value_name = "SECS",
        help = with_default(
            "Seconds an undelivered direct message is kept and retried before it expires",
            DEFAULT_MESSAGE_LIFETIME.as_secs(),
        )
    )]
    pub(crate) message_lifetime_secs: Option<u64>,
    /// Limit on file uploads, bytes per second, e.g. 20MiB (K, M, G are
    /// powers of 1000; KiB, MiB, GiB powers of 1024). Default: none.
    #[arg(
        long,
        value_name = "RATE",
        env = "FOGMESH_MAX_UPLOAD_RATE",
        value_parser = parse_rate
    )]
    #[serde(deserialize_with = "from_str::rate")]
    pub(crate) max_upload_rate: Option<u64>,
    /// Limit on file downloads, bytes per second, e.g. 20MiB. Default: none.
    #[arg(
        long,
        value_name = "RATE",
        env = "FOGMESH_MAX_DOWNLOAD_RATE",
        value_parser = parse_rate
    )]
    #[serde(deserialize_with = "from_str::rate")]
    pub(crate) max_download_rate: Option<u64>,
    /// Write every gossip message received on the wire (duplicates
    /// included), every delivery and every publish as NDJSON to this file,
    /// in the gossipsub-interop style (for studies under Shadow).
    #[arg(long, value_name = "PATH", env = "FOGMESH_EVENT_LOG")]
    pub(crate) event_log: Option<PathBuf>,
    /// Turn BLE on: an adapter name such as hci0 (BlueZ; needs a build with
    /// the `bluez` feature), or sim:SOCKET to join a simulated medium run
    /// by `fogmesh radio serve`.
    #[arg(
        long,
        value_name = "hci0|sim:SOCKET",
        env = "FOGMESH_BLE",
        value_parser = parse_ble
    )]
    #[serde(deserialize_with = "from_str::ble")]
    pub(crate) ble: Option<BleRadio>,
    #[arg(
        long,
        value_name = "X,Y",
        env = "FOGMESH_BLE_POSITION",
        value_parser = parse_position,
        allow_hyphen_values = true,
        help = with_default(
            "This node's position on a simulated medium, metres",
            position_text(fogmesh_ble::sim::Position::default()),
        )
    )]
    #[serde(deserialize_with = "from_str::position")]
    pub(crate) ble_position: Option<fogmesh_ble::sim::Position>,
    /// Turn the IP transports (TCP, QUIC, mDNS) off: an offline peer that
    /// only talks over BLE.
    #[arg(
        long = "no-internet",
        env = "FOGMESH_NO_INTERNET",
        num_args = 0,
        default_missing_value = "true",
        value_parser = switched_off()
    )]
    pub(crate) internet: Option<bool>,
    /// Circuit relay to reserve a slot on, ending with /p2p/<peer id>
    /// (repeatable); private nodes also pick relays among their peers.
    #[arg(
        long = "relay",
        value_name = "MULTIADDR",
        env = "FOGMESH_RELAY",
        value_delimiter = ',',
        value_parser = parse_bootstrap
    )]
    #[serde(rename = "relay", deserialize_with = "from_str::bootstrap")]
    pub(crate) relays: Option<Vec<Multiaddr>>,
    /// Relay circuits for others (relay v2 defaults: 128 reservations,
    /// circuits of 2 min and 128 KiB), once AutoNAT confirms a public
    /// address.
    #[arg(
        long,
        env = "FOGMESH_RELAY_SERVER",
        num_args = 0,
        default_missing_value = "true",
        value_parser = FalseyValueParser::new()
    )]
    pub(crate) relay_server: Option<bool>,
    #[arg(
        long,
        value_name = "MODE",
        env = "FOGMESH_KAD_MODE",
        help = with_default(
            "Kademlia mode: auto follows reachability (server when public, client when private or unproven on the internet, server on a LAN); server or client force it",
            KadMode::default(),
        )
    )]
    pub(crate) kad_mode: Option<KadMode>,
    /// AutoNAT judges private and loopback addresses like public ones:
    /// for test networks and LANs built of private ranges, never on the
    /// internet.
    #[arg(
        long,
        env = "FOGMESH_AUTONAT_PRIVATE_ADDRS",
        num_args = 0,
        default_missing_value = "true",
        value_parser = FalseyValueParser::new()
    )]
    pub(crate) autonat_private_addrs: Option<bool>,
    /// How long a reservation on this node's relay server lasts, seconds
    /// (relay v2's default: 3600); clients renew at three quarters of it.
    #[arg(long, value_name = "SECS", env = "FOGMESH_RELAY_RESERVATION_SECS")]
    pub(crate) relay_reservation_secs: Option<u64>,
    /// Accept group invitations from this admin without asking
    /// (repeatable); others wait in `fogmesh group invites`.
    #[arg(
        long = "trust",
        value_name = "PEER_ID",
        env = "FOGMESH_TRUST",
        value_delimiter = ',',
        value_parser = parse_peer_id
    )]
    #[serde(deserialize_with = "from_str::trust")]
    pub(crate) trust: Option<Vec<libp2p::PeerId>>,
    /// Hold no sealed messages for others (deposits are refused; config
    /// key `mailbox = false`).
    #[arg(
        long = "no-mailbox",
        env = "FOGMESH_NO_MAILBOX",
        num_args = 0,
        default_missing_value = "true",
        value_parser = switched_off()
    )]
    pub(crate) mailbox: Option<bool>,
    #[arg(
        long,
        value_name = "BYTES",
        env = "FOGMESH_MAILBOX_QUOTA",
        value_parser = parse_rate,
        help = with_default(
            "Bytes of sealed messages held for others as a mailbox holder, e.g. 64MiB (a depositor gets a quarter, a recipient half)",
            DEFAULT_MAILBOX_QUOTA,
        )
    )]
    #[serde(deserialize_with = "from_str::rate")]
    pub(crate) mailbox_quota: Option<u64>,
    #[arg(
        long,
        value_name = "SECS",
        help = with_default(
            "Seconds a direct message waits for its recipient before it is deposited with mailbox holders (0: never)",
            DEFAULT_MAILBOX_AFTER.as_secs(),
        )
    )]
    pub(crate) mailbox_after_secs: Option<u64>,
    #[arg(
        long,
        value_name = "SECS",
        value_parser = clap::value_parser!(u64).range(1..),
        help = with_default(
            "Seconds between re-checks of mailbox copies: a sender's undelivered deposits and a holder's held envelopes go to the peers now closest to their keys",
            DEFAULT_MAILBOX_RECHECK.as_secs(),
        )
    )]
    pub(crate) mailbox_recheck_secs: Option<u64>,
    /// Relay onion packets for others (a mix node). Default: off (see
    /// docs/protocols/onion.md, "Who relays").
    #[arg(
        long,
        env = "FOGMESH_MIX",
        num_args = 0,
        default_missing_value = "true",
        value_parser = FalseyValueParser::new()
    )]
    pub(crate) mix: Option<bool>,
    #[arg(
        long,
        value_name = "N",
        env = "FOGMESH_ONION_HOPS",
        help = with_default(
            "Mix hops of an onion path, 1 to 4 (the recipient is the hop after them)",
            fogmesh_protocols::onion::DEFAULT_HOPS,
        )
    )]
    pub(crate) onion_hops: Option<usize>,
    #[arg(
        long,
        value_name = "MS",
        env = "FOGMESH_MIX_DELAY_MS",
        help = with_default(
            "Mean per-hop mixing delay of onion packets, ms (exponential; 0 is the fast profile, weaker)",
            fogmesh_protocols::onion::DEFAULT_DELAY_MS,
        )
    )]
    pub(crate) mix_delay_ms: Option<u64>,
    /// Loop cover packets per second sent through the mix nodes (0, the
    /// default, turns cover traffic off; keep it off on metered links).
    #[arg(long, value_name = "PER_SEC", env = "FOGMESH_COVER_RATE")]
    pub(crate) cover_rate: Option<f64>,
    /// Test hook (debug builds only): each private message's first packet
    /// is also sent as a replay and tampered.
    #[cfg(debug_assertions)]
    #[arg(long, hide = true, num_args = 0, default_missing_value = "true")]
    #[serde(skip)]
    pub(crate) onion_test_replay_tamper: Option<bool>,
}

/// Parses `--trust` (and the `trust` key): a peer id.
pub fn parse_peer_id(s: &str) -> Result<libp2p::PeerId, String> {
    s.parse()
        .map_err(|e| format!("{s:?} is not a peer id: {e}"))
}

/// A help line that ends with the default, formatted from the value the
/// daemon falls back on.
fn with_default(help: &str, default: impl Display) -> String {
    format!("{help} [default: {default}]")
}

fn position_text(p: fogmesh_ble::sim::Position) -> String {
    format!("{},{}", p.x, p.y)
}

/// Parses a `--no-X` switch (or its variable, `FOGMESH_NO_X=1`) into the
/// setting `X`: given means off; a false-looking variable (`0`, `false`,
/// `no`, `off`, empty) means on.
fn switched_off() -> impl clap::builder::TypedValueParser<Value = bool> {
    FalseyValueParser::new().map(|off: bool| !off)
}

impl Overrides {
    /// Reads `config.toml` from `data_dir`; an absent file says nothing.
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let p = data_dir.join(CONFIG_FILE);
        match std::fs::read_to_string(&p) {
            Ok(text) => toml::from_str(&text)
                .with_context(|| format!("invalid config file {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }
}

impl Settings {
    /// Merges the layers: `over` (flags and environment) beats `file`
    /// (`config.toml`), which beats the defaults. `data_dir` is already
    /// resolved.
    pub fn resolve(data_dir: PathBuf, file: Overrides, over: Overrides) -> anyhow::Result<Self> {
        let onion = onion_settings(&file, &over)?;
        let ble = over.ble.or(file.ble);
        let internet = over.internet.or(file.internet).unwrap_or(true);
        let listen = match over.listen.or(file.listen) {
            Some(listen) => listen,
            None if internet => default_listen(),
            None => Vec::new(),
        };
        check_transports(internet, ble.is_some(), &listen)?;
        let api = over.api.or(file.api).unwrap_or(DEFAULT_API_ADDR);
        if !api.ip().is_loopback() {
            bail!(
                "the API address {api} is not a loopback address: the local API must not be reachable from the network"
            );
        }
        let group_rate = over
            .group_rate
            .or(file.group_rate)
            .unwrap_or(GroupsConfig::default().sender_rate);
        if !(group_rate.is_finite() && group_rate > 0.0) {
            bail!(
                "the group rate must be a positive number of messages per second, not {group_rate}"
            );
        }
        Ok(Settings {
            onion,
            data_dir,
            listen,
            bootstrap: over.bootstrap.or(file.bootstrap).unwrap_or_default(),
            api,
            mdns: internet && over.mdns.or(file.mdns).unwrap_or(true),
            tcp_port_reuse: over.tcp_port_reuse.or(file.tcp_port_reuse).unwrap_or(true),
            metrics: over.metrics.or(file.metrics),
            log_format: over.log_format.or(file.log_format).unwrap_or_default(),
            max_connections: over
                .max_connections
                .or(file.max_connections)
                .unwrap_or(BehaviourConfig::default().max_connections),
            min_peers: over
                .min_peers
                .or(file.min_peers)
                .unwrap_or(DEFAULT_MIN_PEERS),
            idle_timeout: over
                .idle_timeout_secs
                .or(file.idle_timeout_secs)
                .map_or(DEFAULT_IDLE_TIMEOUT, Duration::from_secs),
            group_rate,
            message_timeout: over
                .message_timeout_secs
                .or(file.message_timeout_secs)
                .filter(|s| *s > 0)
                .map_or(DEFAULT_MESSAGE_TIMEOUT, Duration::from_secs),
            message_lifetime: over
                .message_lifetime_secs
                .or(file.message_lifetime_secs)
                .filter(|s| *s > 0)
                .map_or(DEFAULT_MESSAGE_LIFETIME, Duration::from_secs),
            trust: over.trust.or(file.trust).unwrap_or_default(),
            max_upload_rate: over.max_upload_rate.or(file.max_upload_rate),
            max_download_rate: over.max_download_rate.or(file.max_download_rate),
            event_log: over.event_log.or(file.event_log),
            ble,
            ble_position: over.ble_position.or(file.ble_position).unwrap_or_default(),
            internet,
            relays: over.relays.or(file.relays).unwrap_or_default(),
            relay_server: over.relay_server.or(file.relay_server).unwrap_or(false),
            kad_mode: over.kad_mode.or(file.kad_mode).unwrap_or_default(),
            autonat_private_addrs: over
                .autonat_private_addrs
                .or(file.autonat_private_addrs)
                .unwrap_or(false),
            relay_reservation: over
                .relay_reservation_secs
                .or(file.relay_reservation_secs)
                .filter(|s| *s > 0)
                .map_or(DEFAULT_RELAY_RESERVATION, Duration::from_secs),
            mailbox: over.mailbox.or(file.mailbox).unwrap_or(true),
            mailbox_quota: over
                .mailbox_quota
                .or(file.mailbox_quota)
                .unwrap_or(DEFAULT_MAILBOX_QUOTA),
            mailbox_after: match over.mailbox_after_secs.or(file.mailbox_after_secs) {
                Some(0) => None,
                Some(s) => Some(Duration::from_secs(s)),
                None => Some(DEFAULT_MAILBOX_AFTER),
            },
            mailbox_recheck: over
                .mailbox_recheck_secs
                .or(file.mailbox_recheck_secs)
                .map_or(DEFAULT_MAILBOX_RECHECK, |s| Duration::from_secs(s.max(1))),
        })
    }
}

/// The onion route's settings, checked.
fn onion_settings(file: &Overrides, over: &Overrides) -> anyhow::Result<crate::onion::OnionConfig> {
    use fogmesh_protocols::onion::{MAX_DELAY_MS, MAX_HOPS, MIN_HOPS};
    let mut cfg = crate::onion::OnionConfig::default();
    cfg.mix = over.mix.or(file.mix).unwrap_or(false);
    cfg.hops = over.onion_hops.or(file.onion_hops).unwrap_or(cfg.hops);
    if !(MIN_HOPS..=MAX_HOPS).contains(&cfg.hops) {
        bail!(
            "--onion-hops must be between {MIN_HOPS} and {MAX_HOPS} (Sphinx carries 5 layers and the recipient takes one), not {}",
            cfg.hops
        );
    }
    cfg.mean_delay_ms = over
        .mix_delay_ms
        .or(file.mix_delay_ms)
        .unwrap_or(cfg.mean_delay_ms);
    if cfg.mean_delay_ms > MAX_DELAY_MS {
        bail!("--mix-delay-ms must be at most {MAX_DELAY_MS}");
    }
    cfg.cover_rate = over.cover_rate.or(file.cover_rate).unwrap_or(0.0);
    if !(cfg.cover_rate.is_finite() && (0.0..=100.0).contains(&cfg.cover_rate)) {
        bail!("--cover-rate must be between 0 and 100 packets per second");
    }
    #[cfg(debug_assertions)]
    {
        cfg.test_replay_tamper = over.onion_test_replay_tamper.unwrap_or(false);
    }
    Ok(cfg)
}

/// Refuses transport settings that leave the node without a transport or
/// that cannot be honoured.
fn check_transports(internet: bool, ble: bool, listen: &[Multiaddr]) -> anyhow::Result<()> {
    if !internet && !ble {
        bail!("--no-internet leaves no transport: turn BLE on with --ble hci0 or --ble sim:SOCKET");
    }
    if !internet && !listen.is_empty() {
        bail!(
            "--no-internet turns the IP transports off, so --listen addresses cannot be used with it"
        );
    }
    Ok(())
}

/// The listen addresses used when none are configured: TCP and QUIC on all
/// IPv4 interfaces, on the default port.
pub fn default_listen() -> Vec<Multiaddr> {
    vec![
        Multiaddr::empty()
            .with(Protocol::Ip4([0, 0, 0, 0].into()))
            .with(Protocol::Tcp(DEFAULT_P2P_PORT)),
        Multiaddr::empty()
            .with(Protocol::Ip4([0, 0, 0, 0].into()))
            .with(Protocol::Udp(DEFAULT_P2P_PORT))
            .with(Protocol::QuicV1),
    ]
}

/// The default data directory of the platform (on Linux,
/// `$XDG_DATA_HOME/fogmesh` or `~/.local/share/fogmesh`).
pub fn default_data_dir() -> anyhow::Result<PathBuf> {
    directories::ProjectDirs::from("", "", "fogmesh")
        .map(|d| d.data_dir().to_path_buf())
        .context("cannot determine a default data directory (no home directory?): pass --data-dir")
}

/// Checks that a bootstrap address names its peer (`/p2p/<id>` at the end).
pub fn check_bootstrap(addr: &Multiaddr) -> Result<(), String> {
    match crate::storage::last_peer(addr) {
        Some(_) => Ok(()),
        None => Err(format!(
            "bootstrap address {addr} does not end with /p2p/<peer id>"
        )),
    }
}

/// Parses a rate such as `20MiB` (bytes per second; suffixes K, M, G are
/// powers of 1000, KiB, MiB, GiB powers of 1024); 0 is refused.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    match fogmesh_protocols::files::parse_rate(s) {
        Ok(0) => Err("a rate of 0 would stop all transfers".into()),
        Ok(r) => Ok(r),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses `--bootstrap` (and the `bootstrap` key): a multiaddr that ends
/// with `/p2p/<peer id>`.
pub fn parse_bootstrap(s: &str) -> Result<Multiaddr, String> {
    let addr: Multiaddr = s.parse().map_err(|e| format!("not a multiaddr: {e}"))?;
    check_bootstrap(&addr)?;
    Ok(addr)
}

/// Parses `--ble`: `sim:SOCKET` or an adapter name like `hci0`.
pub fn parse_ble(s: &str) -> Result<BleRadio, String> {
    if let Some(path) = s.strip_prefix("sim:") {
        if path.is_empty() {
            return Err(
                "--ble sim: needs the medium's socket path, as in sim:/tmp/radio.sock".into(),
            );
        }
        return Ok(BleRadio::Sim(PathBuf::from(path)));
    }
    if !s.is_empty() && s.len() <= 16 && s.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Ok(BleRadio::Adapter(s.to_owned()));
    }
    Err(format!(
        "--ble {s:?}: expected an adapter name such as hci0, or sim:SOCKET for a simulated medium"
    ))
}

/// Parses `--ble-position X,Y` (metres).
pub fn parse_position(s: &str) -> Result<fogmesh_ble::sim::Position, String> {
    s.parse()
}

/// serde adapters for the config keys whose values are strings parsed like
/// their flags (`deserialize_with` wants one function per value type).
mod from_str {
    use libp2p::Multiaddr;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};

    use super::BleRadio;

    type Parse<T> = fn(&str) -> Result<T, String>;

    fn one<'de, D: Deserializer<'de>, T>(d: D, parse: Parse<T>) -> Result<Option<T>, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Some).map_err(D::Error::custom)
    }

    fn list<'de, D: Deserializer<'de>, T>(
        d: D,
        parse: Parse<T>,
    ) -> Result<Option<Vec<T>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| parse(s).map_err(D::Error::custom))
            .collect::<Result<_, _>>()
            .map(Some)
    }

    fn multiaddr(s: &str) -> Result<Multiaddr, String> {
        s.parse()
            .map_err(|e| format!("{s:?} is not a multiaddr: {e}"))
    }

    pub(super) fn listen<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<Multiaddr>>, D::Error> {
        list(d, multiaddr)
    }

    pub(super) fn bootstrap<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<Multiaddr>>, D::Error> {
        list(d, super::parse_bootstrap)
    }

    pub(super) fn trust<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<libp2p::PeerId>>, D::Error> {
        list(d, super::parse_peer_id)
    }

    pub(super) fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        one(d, super::parse_rate)
    }

    pub(super) fn ble<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BleRadio>, D::Error> {
        one(d, super::parse_ble)
    }

    pub(super) fn position<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<fogmesh_ble::sim::Position>, D::Error> {
        one(d, super::parse_position)
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    /// `fogmesh run`'s settings alone, parsed the way the CLI parses them.
    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        settings: Overrides,
    }

    fn flags(args: &[&str]) -> Overrides {
        let argv = std::iter::once("run").chain(args.iter().copied());
        Flags::try_parse_from(argv).expect("flags").settings
    }

    fn file(text: &str) -> Overrides {
        toml::from_str(text).expect("toml")
    }

    fn resolve(file: Overrides, over: Overrides) -> anyhow::Result<Settings> {
        Settings::resolve("/tmp/x".into(), file, over)
    }

    #[test]
    fn flags_beat_file_beat_defaults() {
        let file = file(
            r#"
            api = "127.0.0.1:9000"
            mdns = false
            max_connections = 10
            listen = ["/ip4/127.0.0.1/tcp/1"]
            group_rate = 5
            "#,
        );
        let over = flags(&["--api", "127.0.0.1:9001", "--group-rate", "7"]);
        let s = resolve(file, over).expect("resolve");
        assert_eq!(s.api.port(), 9001);
        assert_eq!(s.group_rate, 7.0);
        assert!(!s.mdns);
        assert_eq!(s.max_connections, 10);
        assert_eq!(
            s.listen,
            vec!["/ip4/127.0.0.1/tcp/1".parse::<Multiaddr>().expect("ma")]
        );
        assert_eq!(s.min_peers, DEFAULT_MIN_PEERS);
    }

    #[test]
    fn defaults_are_the_node_configs_defaults() {
        let s = resolve(Overrides::default(), Overrides::default()).expect("resolve");
        assert_eq!(
            s.max_connections,
            BehaviourConfig::default().max_connections
        );
        assert_eq!(s.group_rate, GroupsConfig::default().sender_rate);
        assert_eq!(s.min_peers, DEFAULT_MIN_PEERS);
        assert_eq!(s.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(s.api, DEFAULT_API_ADDR);
        assert_eq!(s.listen, default_listen());
        assert_eq!(s.log_format, LogFormat::Text);
        assert!(s.mdns && s.internet && s.ble.is_none() && s.bootstrap.is_empty());
        assert_eq!((s.max_upload_rate, s.max_download_rate), (None, None));
    }

    #[test]
    fn help_shows_the_defaults_the_daemon_uses() {
        let help = Flags::command().render_help().to_string();
        for default in [
            format!("[default: {}]", BehaviourConfig::default().max_connections),
            format!("[default: {}]", GroupsConfig::default().sender_rate),
            format!("[default: {DEFAULT_API_ADDR}]"),
            format!("[default: {}]", DEFAULT_IDLE_TIMEOUT.as_secs()),
            format!("tcp/{DEFAULT_P2P_PORT}"),
        ] {
            assert!(help.contains(&default), "{default} missing from:\n{help}");
        }
    }

    #[test]
    fn switches_say_nothing_unless_given() {
        assert_eq!(flags(&[]).mdns, None);
        assert_eq!(flags(&["--no-mdns"]).mdns, Some(false));
        assert_eq!(flags(&["--no-internet"]).internet, Some(false));
        let from_file = resolve(file("mdns = false"), flags(&[])).expect("resolve");
        assert!(!from_file.mdns);
        // A switch takes no value on the command line.
        assert!(Flags::try_parse_from(["run", "--no-mdns=false"]).is_err());
    }

    #[test]
    fn trust_comes_from_flags_or_the_config_file() {
        let a = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
        let b = libp2p::PeerId::random().to_base58();
        let s = resolve(file(&format!("trust = [\"{a}\"]")), flags(&[])).expect("resolve");
        assert_eq!(s.trust.len(), 1);
        assert_eq!(s.trust[0].to_base58(), a);
        // Flags replace the file's list; --trust repeats.
        let s = resolve(
            file(&format!("trust = [\"{a}\"]")),
            flags(&["--trust", &b, "--trust", a]),
        )
        .expect("resolve");
        assert_eq!(s.trust.len(), 2);
        assert_eq!(s.trust[0].to_base58(), b);
        assert!(toml::from_str::<Overrides>("trust = [\"not-a-peer\"]").is_err());
        assert!(Flags::try_parse_from(["run", "--trust", "nope"]).is_err());
        assert!(resolve(Overrides::default(), flags(&[])).is_ok_and(|s| s.trust.is_empty()));
    }

    #[test]
    fn unknown_config_key_is_an_error() {
        assert!(toml::from_str::<Overrides>("mnds = false").is_err());
        // Flags are not config keys.
        assert!(toml::from_str::<Overrides>("no_mdns = true").is_err());
    }

    #[test]
    fn config_values_are_parsed_like_flags() {
        let s = resolve(
            file(
                r#"
                max_upload_rate = "20MiB"
                bootstrap = ["/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"]
                "#,
            ),
            Overrides::default(),
        )
        .expect("resolve");
        assert_eq!(s.max_upload_rate, Some(20 * 1024 * 1024));
        assert_eq!(s.bootstrap.len(), 1);
        for bad in [
            r#"bootstrap = ["/ip4/127.0.0.1/tcp/1"]"#,
            r#"listen = ["banana"]"#,
            r#"max_download_rate = "0""#,
            r#"ble = "../etc""#,
            r#"ble_position = "north""#,
        ] {
            let e = toml::from_str::<Overrides>(bad).expect_err(bad);
            let key = bad.split(' ').next().unwrap_or_default();
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn bootstrap_needs_a_peer_id() {
        assert!(parse_bootstrap("/ip4/127.0.0.1/tcp/1").is_err());
        assert!(parse_bootstrap("not-a-multiaddr").is_err());
        assert!(
            parse_bootstrap(
                "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
            )
            .is_ok()
        );
    }

    #[test]
    fn ble_settings() {
        assert_eq!(parse_ble("hci0"), Ok(BleRadio::Adapter("hci0".into())));
        assert_eq!(
            parse_ble("sim:/tmp/r.sock"),
            Ok(BleRadio::Sim("/tmp/r.sock".into()))
        );
        assert!(parse_ble("sim:").is_err());
        assert!(parse_ble("../etc").is_err());
        assert!(resolve(Overrides::default(), flags(&["--no-internet"])).is_err());
        let s = resolve(
            Overrides::default(),
            flags(&["--no-internet", "--ble", "hci0"]),
        )
        .expect("offline with BLE");
        assert!(s.listen.is_empty() && !s.mdns && !s.internet);
        let offline_listen = [
            "--no-internet",
            "--ble",
            "hci0",
            "--listen",
            "/ip4/0.0.0.0/tcp/0",
        ];
        assert!(resolve(Overrides::default(), flags(&offline_listen)).is_err());
        let s = resolve(
            file("ble = \"sim:/tmp/m\"\nble_position = \"3,4\""),
            Overrides::default(),
        )
        .expect("file");
        assert_eq!(s.ble, Some(BleRadio::Sim("/tmp/m".into())));
        assert_eq!(s.ble_position.x, 3.0);
        let s = resolve(Overrides::default(), flags(&["--ble-position", "-2,5"])).expect("flag");
        assert_eq!(s.ble_position.x, -2.0);
    }

    #[test]
    fn nat_settings() {
        let s = resolve(Overrides::default(), Overrides::default()).expect("defaults");
        assert_eq!(s.kad_mode, KadMode::Auto);
        assert!(!s.relay_server && !s.autonat_private_addrs && s.relays.is_empty());
        let relay = "/ip4/10.0.0.1/tcp/1/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";
        let s = resolve(
            file(&format!("relay = [\"{relay}\"]\nkad_mode = \"client\"")),
            flags(&["--relay-server", "--autonat-private-addrs"]),
        )
        .expect("nat");
        assert_eq!(s.relays.len(), 1);
        assert_eq!(s.kad_mode, KadMode::Client);
        assert!(s.relay_server && s.autonat_private_addrs);
        assert_eq!(
            flags(&["--kad-mode", "server"]).kad_mode,
            Some(KadMode::Server)
        );
        assert!(Flags::try_parse_from(["run", "--relay", "/ip4/1.2.3.4/tcp/1"]).is_err());
    }

    #[test]
    fn api_must_be_loopback() {
        assert!(resolve(Overrides::default(), flags(&["--api", "0.0.0.0:1"])).is_err());
        assert!(resolve(file("api = \"192.0.2.1:1\""), Overrides::default()).is_err());
    }

    #[test]
    fn group_rate_must_be_positive() {
        assert!(resolve(file("group_rate = 0"), Overrides::default()).is_err());
        assert!(resolve(Overrides::default(), flags(&["--group-rate", "0"])).is_err());
    }
}
