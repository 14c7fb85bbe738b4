//! The fogmesh node: configuration, identity, storage, the swarm and its
//! event loop, the local API, and the command line that drives them.
//!
//! The `fogmesh` binary is a thin wrapper around [`cli::main`]. The
//! simulator builds nodes from the same pieces ([`behaviour`], [`node`]).
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
pub mod metrics;
pub mod node;
pub mod storage;
pub mod types;
