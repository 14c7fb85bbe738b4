//! `fogmesh open`: a one-time login URL for the chat page the daemon
//! serves, opened in the desktop's browser when there is a desktop.

use std::process::{Command, Stdio};

use clap::Args;

use super::output::Output;
use crate::api::web::LoginUrl;
use crate::client::Client;

#[derive(Debug, Args)]
pub(super) struct OpenArgs {
    /// Only print the URL; do not start a browser.
    #[arg(long)]
    no_browser: bool,
}

/// Asks the daemon for a login URL, prints it and, when a desktop session
/// is present (`DISPLAY` or `WAYLAND_DISPLAY`), opens it with `xdg-open`.
pub(super) async fn run(client: Client, args: OpenArgs, out: Output) -> anyhow::Result<()> {
    let login: LoginUrl = client.post("web/login", &serde_json::json!({})).await?;
    out.show(&login, |w, l| {
        writeln!(
            w,
            "{}\n(valid once, for {} minutes)",
            l.url,
            l.expires_in_secs / 60
        )
    })?;
    let desktop = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    if desktop && !args.no_browser {
        // The URL is on stdout already: a missing xdg-open is not an error.
        if let Err(e) = Command::new("xdg-open")
            .arg(&login.url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            eprintln!("cannot start xdg-open ({e}): open the URL above in a browser");
        }
    }
    Ok(())
}
