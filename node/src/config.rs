//! The daemon's settings, layered: built-in defaults, then the config file in
//! the data directory (`config.toml`), then environment variables, then
//! command-line flags; a later layer wins.
//!
//! Environment variables and flags are both handled by clap (each flag names
//! its `FOGMESH_*` variable), so this module only has to merge what clap
//! produced with the config file and the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use serde::Deserialize;

/// The config file's name inside the data directory.
pub const CONFIG_FILE: &str = "config.toml";

/// The default TCP (and UDP, for QUIC) port the node listens on.
pub const DEFAULT_P2P_PORT: u16 = 7373;
/// The default loopback port of the local API.
pub const DEFAULT_API_PORT: u16 = 7374;

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
}

/// Which BLE radio `--ble` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BleRadio {
    /// A simulated medium served by `fogmesh radio serve` on this socket.
    Sim(PathBuf),
    /// A BlueZ adapter, such as `hci0`.
    Adapter(String),
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

/// What the config file may hold. Every key is optional; unknown keys are an
/// error so that a typo does not go unnoticed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `listen = ["/ip4/0.0.0.0/tcp/7373", ...]`
    pub listen: Option<Vec<String>>,
    /// `bootstrap = ["/ip4/.../tcp/.../p2p/12D3...", ...]`
    pub bootstrap: Option<Vec<String>>,
    /// `api = "127.0.0.1:7374"`
    pub api: Option<SocketAddr>,
    /// `mdns = false` turns mDNS off.
    pub mdns: Option<bool>,
    /// `metrics = "127.0.0.1:9100"`
    pub metrics: Option<SocketAddr>,
    /// `log_format = "json"`
    pub log_format: Option<LogFormat>,
    /// `max_connections = 200`
    pub max_connections: Option<u32>,
    /// `min_peers = 8`
    pub min_peers: Option<usize>,
    /// `idle_timeout_secs = 120`
    pub idle_timeout_secs: Option<u64>,
    /// `group_rate = 50`
    pub group_rate: Option<f64>,
    /// `max_upload_rate = "20MiB"`
    pub max_upload_rate: Option<String>,
    /// `max_download_rate = "20MiB"`
    pub max_download_rate: Option<String>,
    /// `event_log = "/path/events.ndjson"`
    pub event_log: Option<PathBuf>,
    /// `ble = "hci0"` or `ble = "sim:/path/to/medium.sock"`
    pub ble: Option<String>,
    /// `ble_position = "10,5"` (metres, on a simulated medium)
    pub ble_position: Option<String>,
    /// `internet = false` turns TCP, QUIC and mDNS off
    pub internet: Option<bool>,
}

impl FileConfig {
    /// Reads `config.toml` from `data_dir`; an absent file is an empty
    /// config.
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

/// What the command line and environment said (clap's output for `run`).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen` / `FOGMESH_LISTEN`.
    pub listen: Vec<Multiaddr>,
    /// `--bootstrap` / `FOGMESH_BOOTSTRAP`.
    pub bootstrap: Vec<Multiaddr>,
    /// `--api` / `FOGMESH_API`.
    pub api: Option<SocketAddr>,
    /// `--no-mdns` / `FOGMESH_NO_MDNS`.
    pub no_mdns: bool,
    /// `--metrics` / `FOGMESH_METRICS`.
    pub metrics: Option<SocketAddr>,
    /// `--log-format` / `FOGMESH_LOG_FORMAT`.
    pub log_format: Option<LogFormat>,
    /// `--max-connections`.
    pub max_connections: Option<u32>,
    /// `--min-peers`.
    pub min_peers: Option<usize>,
    /// `--idle-timeout-secs`.
    pub idle_timeout_secs: Option<u64>,
    /// `--group-rate`.
    pub group_rate: Option<f64>,
    /// `--max-upload-rate`, bytes per second.
    pub max_upload_rate: Option<u64>,
    /// `--max-download-rate`, bytes per second.
    pub max_download_rate: Option<u64>,
    /// `--event-log`.
    pub event_log: Option<PathBuf>,
    /// `--ble`.
    pub ble: Option<BleRadio>,
    /// `--ble-position`.
    pub ble_position: Option<fogmesh_ble::sim::Position>,
    /// `--no-internet`.
    pub no_internet: bool,
}

impl Settings {
    /// Merges the layers. `data_dir` is already resolved.
    pub fn resolve(data_dir: PathBuf, file: FileConfig, over: Overrides) -> anyhow::Result<Self> {
        let ble = match over.ble {
            Some(b) => Some(b),
            None => file
                .ble
                .as_deref()
                .map(parse_ble)
                .transpose()
                .map_err(|e| anyhow::anyhow!("config key ble: {e}"))?,
        };
        let ble_position = match over.ble_position {
            Some(p) => p,
            None => file
                .ble_position
                .as_deref()
                .map(parse_position)
                .transpose()
                .map_err(|e| anyhow::anyhow!("config key ble_position: {e}"))?
                .unwrap_or_default(),
        };
        let internet = !over.no_internet && file.internet.unwrap_or(true);
        if !internet && ble.is_none() {
            bail!(
                "--no-internet leaves no transport: turn BLE on with --ble hci0 or --ble sim:SOCKET"
            );
        }
        let listen = if !over.listen.is_empty() {
            over.listen
        } else if let Some(list) = file.listen {
            parse_list(&list, "listen", |_| Ok(()))?
        } else if internet {
            default_listen()
        } else {
            Vec::new()
        };
        if !internet && !listen.is_empty() {
            bail!(
                "--no-internet turns the IP transports off, so --listen addresses cannot be used with it"
            );
        }
        let bootstrap = if !over.bootstrap.is_empty() {
            over.bootstrap
        } else if let Some(list) = file.bootstrap {
            parse_list(&list, "bootstrap", check_bootstrap)?
        } else {
            Vec::new()
        };
        let api = over
            .api
            .or(file.api)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT)));
        let group_rate = over.group_rate.or(file.group_rate).unwrap_or(50.0);
        if !(group_rate.is_finite() && group_rate > 0.0) {
            bail!(
                "the group rate must be a positive number of messages per second, not {group_rate}"
            );
        }
        let rate = |key: &str, v: Option<String>| -> anyhow::Result<Option<u64>> {
            v.map(|s| parse_rate(&s).map_err(|e| anyhow::anyhow!("config key {key}: {e}")))
                .transpose()
        };
        let max_upload_rate = match over.max_upload_rate {
            Some(r) => Some(r),
            None => rate("max_upload_rate", file.max_upload_rate)?,
        };
        let max_download_rate = match over.max_download_rate {
            Some(r) => Some(r),
            None => rate("max_download_rate", file.max_download_rate)?,
        };
        if !api.ip().is_loopback() {
            bail!(
                "the API address {api} is not a loopback address: the local API must not be reachable from the network"
            );
        }
        Ok(Settings {
            data_dir,
            listen,
            bootstrap,
            api,
            mdns: internet && !over.no_mdns && file.mdns.unwrap_or(true),
            metrics: over.metrics.or(file.metrics),
            log_format: over.log_format.or(file.log_format).unwrap_or_default(),
            max_connections: over.max_connections.or(file.max_connections).unwrap_or(200),
            min_peers: over.min_peers.or(file.min_peers).unwrap_or(8),
            idle_timeout: Duration::from_secs(
                over.idle_timeout_secs
                    .or(file.idle_timeout_secs)
                    .unwrap_or(300),
            ),
            group_rate,
            max_upload_rate,
            max_download_rate,
            event_log: over.event_log.or(file.event_log),
            ble,
            ble_position,
            internet,
        })
    }
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
    match addr.iter().last() {
        Some(Protocol::P2p(_)) => Ok(()),
        _ => Err(format!(
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

/// clap value parser for `--bootstrap`.
pub fn parse_bootstrap(s: &str) -> Result<Multiaddr, String> {
    let addr: Multiaddr = s.parse().map_err(|e| format!("not a multiaddr: {e}"))?;
    check_bootstrap(&addr)?;
    Ok(addr)
}

fn parse_list(
    list: &[String],
    key: &str,
    check: impl Fn(&Multiaddr) -> Result<(), String>,
) -> anyhow::Result<Vec<Multiaddr>> {
    list.iter()
        .map(|s| {
            let addr: Multiaddr = s
                .parse()
                .with_context(|| format!("config key {key}: {s:?} is not a multiaddr"))?;
            check(&addr).map_err(|e| anyhow::anyhow!("config key {key}: {e}"))?;
            Ok(addr)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_beat_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            api = "127.0.0.1:9000"
            mdns = false
            max_connections = 10
            listen = ["/ip4/127.0.0.1/tcp/1"]
            "#,
        )
        .expect("toml");
        let over = Overrides {
            api: Some("127.0.0.1:9001".parse().expect("addr")),
            ..Default::default()
        };
        let s = Settings::resolve("/tmp/x".into(), file, over).expect("resolve");
        assert_eq!(s.api.port(), 9001);
        assert!(!s.mdns);
        assert_eq!(s.max_connections, 10);
        assert_eq!(
            s.listen,
            vec!["/ip4/127.0.0.1/tcp/1".parse::<Multiaddr>().expect("ma")]
        );
        assert_eq!(s.min_peers, 8);
    }

    #[test]
    fn unknown_config_key_is_an_error() {
        assert!(toml::from_str::<FileConfig>("mnds = false").is_err());
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
        let offline = |ble| Overrides {
            no_internet: true,
            ble,
            ..Default::default()
        };
        assert!(Settings::resolve("/tmp/x".into(), FileConfig::default(), offline(None)).is_err());
        let s = Settings::resolve(
            "/tmp/x".into(),
            FileConfig::default(),
            offline(Some(BleRadio::Adapter("hci0".into()))),
        )
        .expect("offline with BLE");
        assert!(s.listen.is_empty() && !s.mdns && !s.internet);
        let file: FileConfig =
            toml::from_str("ble = \"sim:/tmp/m\"\nble_position = \"3,4\"").expect("toml");
        let s = Settings::resolve("/tmp/x".into(), file, Overrides::default()).expect("file");
        assert_eq!(s.ble, Some(BleRadio::Sim("/tmp/m".into())));
        assert_eq!(s.ble_position.x, 3.0);
    }

    #[test]
    fn api_must_be_loopback() {
        let over = Overrides {
            api: Some("0.0.0.0:1".parse().expect("addr")),
            ..Default::default()
        };
        assert!(Settings::resolve("/tmp/x".into(), FileConfig::default(), over).is_err());
    }
}
