//! The node's Ed25519 identity: created on first start, kept in the data
//! directory (mode 0600), loaded on every later start.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use libp2p::identity::Keypair;

use crate::fsutil;

/// The identity file's name inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// The path of the identity file in `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(IDENTITY_FILE)
}

/// Loads the identity from `data_dir`, or creates and saves a new one when
/// there is none.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Keypair> {
    match load(data_dir)? {
        Some(key) => Ok(key),
        None => {
            fsutil::ensure_private_dir(data_dir)
                .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .context("cannot encode the new identity")?;
            let p = path(data_dir);
            fsutil::write_atomic(&p, &bytes, true)
                .with_context(|| format!("cannot write identity file {}", p.display()))?;
            tracing::info!(path = %p.display(), "created a new identity");
            Ok(key)
        }
    }
}

/// Loads the identity from `data_dir`; `None` when the file does not exist.
pub fn load(data_dir: &Path) -> anyhow::Result<Option<Keypair>> {
    let p = path(data_dir);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
    };
    let key = Keypair::from_protobuf_encoding(&bytes)
        .with_context(|| format!("identity file {} is corrupt", p.display()))?;
    // Private even if it was copied in with a looser mode.
    fsutil::restrict_to_owner(&p, false)
        .with_context(|| format!("cannot make {} private", p.display()))?;
    if key.key_type() != libp2p::identity::KeyType::Ed25519 {
        bail!("identity file {} is not an Ed25519 key", p.display());
    }
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_kept_across_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = load_or_create(dir.path()).expect("create");
        let b = load_or_create(dir.path()).expect("load");
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
    }

    #[test]
    fn corrupt_identity_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(path(dir.path()), b"garbage").expect("write");
        let err = load_or_create(dir.path()).expect_err("must fail");
        assert!(format!("{err:#}").contains("corrupt"));
    }
}
