//! The fogmesh node: configuration, identity, storage, the swarm and its
//! event loop, the local API, and the command line that drives them.
//!
//! The `fogmesh` binary is a thin wrapper around [`cli::main`]. A node is
//! assembled in one place, [`builder::NodeBuilder`], which the daemon
//! ([`daemon`]) and the simulator both use; docs/architecture.md describes
//! the layout and where a new protocol goes.
#![warn(missing_docs)]

pub mod actor;
pub mod api;
pub mod behaviour;
pub mod builder;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod eventlog;
pub mod files;
pub mod fsutil;
pub mod groups;
pub mod identity;
pub mod kad_store;
pub mod keep_alive;
pub mod mailbox;
pub mod messages;
pub mod metrics;
pub mod negotiation;
pub mod node;
pub mod onion;
pub mod only_on;
pub mod storage;
pub mod types;
pub mod wrap;
