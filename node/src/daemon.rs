//! `fogmesh run`: maps its settings to a [`NodeBuilder`], runs the node
//! with its local API until SIGINT or SIGTERM.
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
use fogmesh_ble::Radio;
use fogmesh_ble::sim::SocketRadio;
use tokio_util::sync::CancellationToken;

use crate::api::{self, Endpoint};
use crate::behaviour::{BehaviourConfig, NatConfig};
use crate::builder::{BuiltNode, Internet, NodeBuilder};
use crate::config::{BleRadio, Settings};
use crate::eventlog::EventLog;
use crate::files::FilesConfig;
use crate::groups::GroupsConfig;
use crate::messages::MessagesConfig;
use crate::metrics;
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
    // 0700 at every start, not only when created: a directory made by
    // hand (or by an older version) keeps the umask's mode otherwise.
    fsutil::restrict_to_owner(&data_dir, true)
        .with_context(|| format!("cannot make data directory {} private", data_dir.display()))?;
    // Opening the database takes its lock: this is what refuses a second
    // daemon on the same data directory.
    let store = tokio::task::spawn_blocking({
        let d = data_dir.clone();
        move || Store::open(&d)
    })
    .await??;
    let key = identity::load_or_create(&data_dir)?;
    let peer_id = key.public().to_peer_id();
    let radio = open_radio(&settings).await?;
    let mut builder = node_builder(&settings, key, store, radio);
    // The node stops after `shutdown`, once waiting messages are
    // deposited with mailbox holders.
    let node_shutdown = CancellationToken::new();
    if let Some(path) = &settings.event_log {
        builder = builder.event_log(EventLog::open(path, &peer_id)?);
    }
    let BuiltNode {
        running,
        registry,
        metrics: node_metrics,
    } = builder.start(node_shutdown.clone()).await?;

    let (api_addr, api_task) = serve_api(&settings, &running, node_metrics, &shutdown).await?;
    let metrics_task = match settings.metrics {
        Some(addr) => Some(serve_metrics(addr, registry, &shutdown).await?),
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
    match print_ready(
        &peer_id,
        &running.listen_addrs,
        api_addr,
        metrics_task.as_ref().map(|(m, _)| *m),
    ) {
        // Nobody reads the ready lines any more (`fogmesh run | head -1`):
        // the node does not need its stdout, so it runs on.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            tracing::debug!("stdout closed before the ready lines were written")
        }
        r => r?,
    }
    tracing::info!(%peer_id, %api_addr, "ready");

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    deposit_before_stopping(running.handle.messages()).await;
    node_shutdown.cancel();
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

/// The longest a stopping node waits for its last deposits.
const DEPOSIT_BEFORE_STOPPING: Duration = Duration::from_secs(5);

/// Deposits every waiting message that has no mailbox holder yet, and
/// waits (at most [`DEPOSIT_BEFORE_STOPPING`]) for the holders' answers:
/// the recipient may come while this node is down.
async fn deposit_before_stopping(messages: &crate::messages::MessagesHandle) {
    let deadline = tokio::time::Instant::now() + DEPOSIT_BEFORE_STOPPING;
    loop {
        match messages.mailbox_flush().await {
            Ok(0) | Err(_) => return,
            Ok(n) => tracing::debug!(n, "waiting for mailbox deposits"),
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!("stopping with mailbox deposits unanswered");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

type Task<T> = tokio::task::JoinHandle<T>;

/// Binds the local API and serves it until shutdown.
async fn serve_api(
    settings: &Settings,
    running: &crate::node::RunningNode,
    metrics: crate::metrics::NodeMetrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<(std::net::SocketAddr, Task<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(settings.api)
        .await
        .with_context(|| {
            format!(
                "cannot listen for the API on {} (use --api HOST:PORT)",
                settings.api
            )
        })?;
    let addr = listener.local_addr()?;
    let token = api::load_or_create_token(&settings.data_dir)?;
    let token_path = settings.data_dir.join(api::TOKEN_FILE);
    fsutil::restrict_to_owner(&token_path, false)
        .with_context(|| format!("cannot make {} private", token_path.display()))?;
    let task = tokio::spawn(api::serve(
        listener,
        running.handle.clone(),
        token,
        metrics,
        shutdown.clone(),
        settings.data_dir.clone(),
    ));
    Ok((addr, task))
}

/// Binds `--metrics` and serves the registry until shutdown.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    registry: libp2p::metrics::Registry,
    shutdown: &CancellationToken,
) -> anyhow::Result<(std::net::SocketAddr, Task<std::io::Result<()>>)> {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "--metrics is not a loopback address: anyone who can reach it reads the node's counters (peers, traffic, groups); put it behind a firewall"
        );
    }
    let listener = metrics::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "serving metrics");
    let task = tokio::spawn(metrics::serve(
        listener,
        Arc::new(registry),
        shutdown.clone(),
    ));
    Ok((bound, task))
}

/// The daemon's node: the settings mapped to builder inputs.
fn node_builder(
    settings: &Settings,
    key: libp2p::identity::Keypair,
    store: Store,
    radio: Option<Arc<dyn Radio>>,
) -> NodeBuilder {
    NodeBuilder::new(key, store)
        .internet(if settings.internet {
            Internet::Host
        } else {
            Internet::Off
        })
        .tcp_port_reuse(settings.tcp_port_reuse)
        .radio(radio)
        .listen(settings.listen.clone())
        .bootstrap(settings.bootstrap.clone())
        .min_peers(settings.min_peers)
        .idle_timeout(settings.idle_timeout)
        .relays(settings.relays.clone())
        .behaviour(BehaviourConfig {
            mdns: settings.mdns,
            max_connections: settings.max_connections,
            kad_mode: settings.kad_mode,
            nat: NatConfig {
                relay_server: settings.relay_server,
                autonat_private_addrs: settings.autonat_private_addrs,
                relay_reservation: settings.relay_reservation,
                ..NatConfig::default()
            },
            ..BehaviourConfig::default()
        })
        .groups(GroupsConfig {
            sender_rate: settings.group_rate,
            trust: settings.trust.clone(),
            ..GroupsConfig::default()
        })
        .messages(MessagesConfig {
            timeouts: message_timeouts(settings.message_timeout),
            lifetime: settings.message_lifetime,
            ..MessagesConfig::default()
        })
        .mailbox(crate::mailbox::MailboxConfig {
            enabled: settings.mailbox,
            quotas: fogmesh_protocols::mailbox::Quotas::from_total(settings.mailbox_quota),
            deposit_after: settings.mailbox_after,
            recheck: settings.mailbox_recheck,
            ..crate::mailbox::MailboxConfig::default()
        })
        .files(FilesConfig {
            max_upload_rate: settings.max_upload_rate,
            max_download_rate: settings.max_download_rate,
            ..FilesConfig::default()
        })
        .onion(settings.onion.clone())
}

/// The receipt timeout of each route, from the internet's: BLE three
/// times as long (several slow hops), onion six times.
fn message_timeouts(internet: std::time::Duration) -> fogmesh_protocols::messages::Timeouts {
    let ms = u64::try_from(internet.as_millis()).unwrap_or(u64::MAX);
    fogmesh_protocols::messages::Timeouts {
        internet_ms: ms,
        ble_ms: ms.saturating_mul(3),
        onion_ms: ms.saturating_mul(6),
    }
}

/// The lines `fogmesh run` prints on stdout once the node is up (scripts
/// and tests wait for `ready`).
fn print_ready(
    peer_id: &libp2p::PeerId,
    listen: &[libp2p::Multiaddr],
    api: std::net::SocketAddr,
    metrics: Option<std::net::SocketAddr>,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "peer_id: {peer_id}")?;
    for a in listen {
        writeln!(out, "listen: {a}")?;
    }
    writeln!(out, "api: {api}")?;
    if let Some(m) = metrics {
        writeln!(out, "metrics: {m}")?;
    }
    writeln!(out, "ready")?;
    out.flush()
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
