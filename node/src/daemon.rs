//! `fogmesh run`: assembles the node from its settings and runs it until
//! SIGINT or SIGTERM.
//!
//! Start-up order: lock the data directory (by opening the database), load
//! or create the identity, build the swarm, start listening, bind the API,
//! write `api.json`, print the ready lines. Teardown order: stop accepting
//! API requests and end event streams, stop the event loop, flush pending
//! database writes, remove `api.json`. Teardown is bounded by
//! [`SHUTDOWN_TIMEOUT`].

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fogmesh_ble::sim::SocketRadio;
use fogmesh_ble::{BleTransport, Radio};
use fogmesh_protocols::policy::Reachability;
use libp2p::{SwarmBuilder, noise, tcp, yamux};
use tokio_util::sync::CancellationToken;

use crate::api::{self, Endpoint};
use crate::behaviour::{Behaviour, BehaviourConfig};
use crate::config::{BleRadio, Settings};
use crate::eventlog::EventLog;
use crate::files::FilesConfig;
use crate::groups::GroupsConfig;
use crate::metrics::{self, NodeMetrics};
use crate::node::{self, NodeConfig};
use crate::storage::Store;
use crate::{fsutil, identity};

/// The longest a graceful shutdown may take before the process exits
/// anyway.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(8);

/// Runs the daemon until a termination signal.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
    let result = run_until(settings, shutdown.clone()).await;
    signals.abort();
    result
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run_until(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let data_dir = settings.data_dir.clone();
    fsutil::ensure_private_dir(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    // Opening the database takes its lock: this is what refuses a second
    // daemon on the same data directory.
    let store = tokio::task::spawn_blocking({
        let d = data_dir.clone();
        move || Store::open(&d)
    })
    .await??;
    let key = identity::load_or_create(&data_dir)?;
    let node_key = key.clone();
    let peer_id = key.public().to_peer_id();

    let mut registry = libp2p::metrics::Registry::default();
    let node_metrics = NodeMetrics::register(&mut registry);
    let event_log = match &settings.event_log {
        Some(path) => Some(EventLog::open(path, &peer_id)?),
        None => None,
    };
    let bcfg = BehaviourConfig {
        mdns: settings.mdns,
        max_connections: settings.max_connections,
        gossip_observer: event_log.as_ref().map(EventLog::observer),
        ..BehaviourConfig::default()
    };
    let idle = settings.idle_timeout;
    let radio = open_radio(&settings).await?;
    let bcfg = match &radio {
        Some(r) => crate::behaviour::scale_for_ble(bcfg, r.limits()),
        None => bcfg,
    };
    // A whole connection set-up (dial, Noise, Yamux) must finish within
    // this: libp2p's 10 s, unless a BLE link (whose dial alone may take
    // 20 s) is among the transports.
    let connection_timeout = if radio.is_some() {
        fogmesh_ble::DIAL_TIMEOUT + BLE_UPGRADE_TIMEOUT
    } else {
        Duration::from_secs(10)
    };
    // The same tail for every combination of transports (the builder's
    // phases are distinct types, hence a macro rather than a function).
    macro_rules! finish {
        ($builder:expr) => {
            $builder
                .with_bandwidth_metrics(&mut registry)
                .with_behaviour(|key| {
                    Behaviour::new(key, &bcfg)
                        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                })
                .map_err(|e| anyhow::anyhow!("cannot build the node's behaviours: {e}"))?
                .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
                .with_connection_timeout(connection_timeout)
                .build()
        };
    }
    macro_rules! with_ip {
        ($builder:expr) => {
            $builder
                .with_tcp(
                    tcp::Config::default().nodelay(true),
                    noise::Config::new,
                    yamux::Config::default,
                )?
                .with_quic()
        };
    }
    let builder = SwarmBuilder::with_existing_identity(key).with_tokio();
    let swarm = match (settings.internet, radio.clone()) {
        (true, None) => finish!(with_ip!(builder).with_dns()?),
        (true, Some(radio)) => finish!(
            with_ip!(builder)
                .with_other_transport(|key| ble_transport(key, radio).map_err(Box::from))?
                .with_dns()?
        ),
        (false, Some(radio)) => {
            finish!(
                builder.with_other_transport(|key| ble_transport(key, radio).map_err(Box::from))?
            )
        }
        (false, None) => anyhow::bail!("no transport is on (--no-internet without --ble)"),
    };
    let libp2p_metrics = libp2p::metrics::Metrics::new(&mut registry);

    let running = node::start(
        node_key,
        swarm,
        store,
        NodeConfig {
            listen: settings.listen.clone(),
            bootstrap: settings.bootstrap.clone(),
            min_peers: settings.min_peers,
            reachability: Reachability {
                internet: settings.internet,
                ble: radio.is_some(),
                onion: false,
            },
            ble: radio.clone(),
            groups: GroupsConfig {
                sender_rate: settings.group_rate,
                ..GroupsConfig::default()
            },
            files: {
                let f = FilesConfig {
                    max_upload_rate: settings.max_upload_rate,
                    max_download_rate: settings.max_download_rate,
                    ..FilesConfig::default()
                };
                match &radio {
                    Some(r) => f.scaled_for_ble(r.limits()),
                    None => f,
                }
            },
            maintenance_interval: node::MAINTENANCE_INTERVAL,
        },
        node_metrics.clone(),
        libp2p_metrics,
        shutdown.clone(),
    )
    .await?;

    if let Some(log) = event_log {
        tokio::spawn(log.follow(running.handle.subscribe(), peer_id));
    }

    let api_listener = tokio::net::TcpListener::bind(settings.api)
        .await
        .with_context(|| {
            format!(
                "cannot listen for the API on {} (use --api HOST:PORT)",
                settings.api
            )
        })?;
    let api_addr = api_listener.local_addr()?;
    let token = api::load_or_create_token(&data_dir)?;
    let api_task = tokio::spawn(api::serve(
        api_listener,
        running.handle.clone(),
        token,
        node_metrics,
        shutdown.clone(),
    ));

    let metrics_task = match settings.metrics {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            let bound = listener.local_addr()?;
            tracing::info!(%bound, "serving metrics");
            Some((
                bound,
                tokio::spawn(metrics::serve(
                    listener,
                    Arc::new(registry),
                    shutdown.clone(),
                )),
            ))
        }
        None => None,
    };

    let endpoint_file = api::write_endpoint(
        &data_dir,
        &Endpoint {
            addr: api_addr.to_string(),
            pid: std::process::id(),
            peer_id: peer_id.to_base58(),
        },
    )?;

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "peer_id: {peer_id}")?;
        for a in &running.listen_addrs {
            writeln!(out, "listen: {a}")?;
        }
        writeln!(out, "api: {api_addr}")?;
        if let Some((m, _)) = &metrics_task {
            writeln!(out, "metrics: {m}")?;
        }
        writeln!(out, "ready")?;
        out.flush()?;
    }
    tracing::info!(%peer_id, %api_addr, "ready");

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    let teardown = async {
        if let Ok(Err(e)) = api_task.await {
            tracing::warn!("API server: {e}");
        }
        if let Some((_, t)) = metrics_task {
            let _ = t.await;
        }
        let _ = running.task.await;
    };
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, teardown)
        .await
        .is_err()
    {
        tracing::warn!("graceful shutdown took longer than {SHUTDOWN_TIMEOUT:?}; exiting anyway");
    }
    let _ = std::fs::remove_file(&endpoint_file);
    tracing::info!("stopped");
    Ok(())
}

/// Longest a BLE connection's Noise and Yamux upgrade may take.
const BLE_UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);

/// The BLE transport, upgraded like any other: Noise, then Yamux (the
/// simulator builds its radio nodes with it too).
pub fn ble_transport(
    key: &libp2p::identity::Keypair,
    radio: Arc<dyn Radio>,
) -> Result<
    libp2p::core::transport::Boxed<(libp2p::PeerId, libp2p::core::muxing::StreamMuxerBox)>,
    noise::Error,
> {
    use libp2p::core::Transport as _;
    use libp2p::core::muxing::StreamMuxerBox;
    let local = key.public().to_peer_id();
    Ok(BleTransport::new(radio, &local)
        .upgrade(libp2p::core::upgrade::Version::V1)
        .authenticate(noise::Config::new(key)?)
        .multiplex(yamux::Config::default())
        .timeout(BLE_UPGRADE_TIMEOUT)
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// Opens the radio `--ble` names, if any.
async fn open_radio(settings: &Settings) -> anyhow::Result<Option<Arc<dyn Radio>>> {
    match &settings.ble {
        None => Ok(None),
        Some(BleRadio::Sim(path)) => {
            let r = SocketRadio::connect(path, settings.ble_position)
                .await
                .with_context(|| format!("--ble sim:{}", path.display()))?;
            tracing::info!(device = %r.address(), medium = %path.display(), "joined the simulated BLE medium");
            Ok(Some(Arc::new(r)))
        }
        #[cfg(feature = "bluez")]
        Some(BleRadio::Adapter(name)) => {
            let r = fogmesh_ble::bluez::BluezRadio::open(Some(name))
                .await
                .with_context(|| format!("--ble {name}: cannot open the BlueZ adapter"))?;
            tracing::info!(device = %r.address(), adapter = %name, "BLE radio on");
            Ok(Some(Arc::new(r)))
        }
        #[cfg(not(feature = "bluez"))]
        Some(BleRadio::Adapter(name)) => anyhow::bail!(
            "--ble {name}: this fogmesh was built without BlueZ support; build it with `cargo build --release -p fogmesh --features bluez` (or use --ble sim:SOCKET)"
        ),
    }
}

pub(crate) async fn wait_for_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot install the SIGTERM handler: {e}");
                let _ = tokio::signal::ctrl_c().await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
}
