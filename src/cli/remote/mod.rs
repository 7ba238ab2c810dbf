//! Hives on other machines, from the queen's machine over SSH: `rbee hive install`,
//! `upgrade`, `uninstall` and `status --ssh`. Each runs the preflight checks first and
//! changes nothing when one fails.
//!
//! On the machine, everything lives under one prefix: `bin/rbee`, the store and the
//! hive's identity under `data` (`RBEE_HOME`), the cache under `cache`, the join token in
//! `data/hive.env` (mode 600; it never appears on a command line). The hive runs as a
//! systemd unit when systemd runs the machine (a user unit for a non-root login), else
//! as a background daemon (`rbee hive start`).

pub mod preflight;
pub mod ssh;

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use rbee::actors::queen::daemon;
use rbee::actors::queen::protocol::HiveState;
use rbee::actors::queen::tokens::TokenStore;

use super::connect::Effective;
use preflight::{Binary, Target};
use ssh::{Input, Ssh, SshArgs};

/// How long a join token made for an install admits the hive.
const TOKEN_TTL: Duration = Duration::from_secs(600);
/// How long a started hive may take to show up connected at the queen.
const JOIN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a stopped hive may take to show up gone (the wait is only for a clean order).
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The systemd unit a remote hive runs as.
const UNIT: &str = "rbee-hive.service";

#[derive(Debug, Args)]
pub struct InstallArgs {
    #[command(flatten)]
    ssh: SshArgs,
    /// The hive's node id (default: the machine's host name).
    #[arg(long)]
    name: Option<String>,
    /// The rbee binary to install (default: this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    #[command(flatten)]
    queen_data: super::queen::DataDir,
    /// The address the machine reaches this queen at, for a queen that listens on all
    /// addresses (default: this machine's address on the route to it).
    #[arg(long)]
    advertise: Option<std::net::IpAddr>,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    ssh: SshArgs,
    /// The rbee binary to install (default: this one).
    #[arg(long)]
    binary: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    ssh: SshArgs,
    /// Also delete the store, the hive's identity and the cache, and remove the hive from
    /// the cluster.
    #[arg(long)]
    purge: bool,
}

fn step(what: &str) {
    println!("- {what}");
}

fn binary(path: Option<PathBuf>) -> anyhow::Result<Binary> {
    let path = match path {
        Some(path) => path,
        None => std::env::current_exe().context("cannot find this rbee binary")?,
    };
    Binary::read(&path)
}

/// The protocol a binary speaks: asked when it runs here, assumed ours when it is us.
fn binary_protocol(path: Option<&PathBuf>) -> anyhow::Result<Option<u32>> {
    let Some(path) = path else {
        return Ok(Some(rbee::transport::PROTOCOL_VERSION));
    };
    let out = std::process::Command::new(path).arg("--version").output();
    Ok(out
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| preflight::protocol_of(&String::from_utf8_lossy(&o.stdout))))
}

pub async fn install(settings: &Effective, args: InstallArgs) -> anyhow::Result<ExitCode> {
    let ssh = Ssh::new(args.ssh)?;
    let binary = binary(args.binary)?;
    let target = preflight::run(&ssh, Some(&binary))?;
    if let Some(installed) = &target.installed {
        anyhow::bail!(
            "{} is installed in {} already: `rbee hive upgrade --ssh {}` replaces it",
            installed.version,
            target.prefix,
            ssh.args.target
        );
    }
    let client = settings.client().await?;
    // A machine whose hive joined before (uninstalled without --purge) rejoins as itself
    // with the identity it kept; otherwise the name must never have joined.
    let kept = joined_name(&ssh, &target)?;
    let name = match &kept {
        Some(name) => name.clone(),
        None => {
            let name = preflight::node_id_from(args.name.as_deref().unwrap_or(&target.node_name));
            rbee::transport::NodeId::new(name.clone())?;
            let joined = TokenStore::new(&args.queen_data.path()).has_joined(&name)?;
            if joined || client.hives().await?.iter().any(|h| h.id == name) {
                anyhow::bail!(
                    "a hive named {name} joined this cluster before, and names are never reused: pass --name"
                );
            }
            name
        }
    };
    let token = match kept {
        Some(_) => None,
        None => {
            // A queen on all addresses is reached at the address this machine reaches
            // the target from, unless told otherwise.
            let advertise = args.advertise.or_else(|| {
                let to = (ssh.host.as_str(), ssh.port())
                    .to_socket_addrs()
                    .ok()?
                    .next()?;
                rbee::transport::route_source_ip(to).ok()
            });
            Some(daemon::create_token(
                &args.queen_data.path(),
                TOKEN_TTL,
                advertise,
            )?)
        }
    };

    copy_binary(&ssh, &target, &binary)?;
    let env_file = target.path("data/hive.env");
    let mut hive = vec!["hive", "start", "--name", &name];
    match &token {
        Some(token) => {
            step("join token into data/hive.env (mode 600)");
            ssh.output(&["mkdir", "-p", "--", &target.path("data")])?;
            ssh.run(
                &["install", "-m", "600", "/dev/stdin", &env_file],
                Input::Bytes(format!("RBEE_JOIN_TOKEN={token}\n").as_bytes()),
            )?
            .output("writing the join token")?;
            hive.extend(["--join-file", &env_file]);
        }
        None => step(&format!(
            "the machine kept hive {name}'s identity: it rejoins as itself"
        )),
    }
    if target.systemd {
        step(&format!("systemd unit {UNIT}, enabled and started"));
        hive[1] = "install-service";
        if !target.root {
            hive.push("--user");
        }
    } else {
        step("hive daemon, in the background (no systemd for this login there)");
    }
    let started = run_rbee(&ssh, &target, &hive)?;
    print!("{started}");
    wait_until(&client, &name, true, JOIN_TIMEOUT).await?;
    println!(
        "hive {name} on {} joined the cluster; `rbee hive status --ssh {}` shows it",
        ssh.args.target, ssh.args.target
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn upgrade(settings: &Effective, args: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let ssh = Ssh::new(args.ssh)?;
    let ours = rbee::transport::PROTOCOL_VERSION;
    let new_protocol = binary_protocol(args.binary.as_ref())?;
    let binary = binary(args.binary)?;
    let target = preflight::run(&ssh, Some(&binary))?;
    let installed = target.installed.clone().with_context(|| {
        format!(
            "no rbee in {}: `rbee hive install --ssh {}` installs one",
            target.prefix, ssh.args.target
        )
    })?;
    // The queen speaks our protocol, or the handshake just now refused us with both.
    let client = settings.client().await?;
    match new_protocol {
        Some(p) if p > ours => anyhow::bail!(
            "the new binary speaks protocol {p} and the queen {ours}: upgrade the queen first"
        ),
        Some(p) if p < ours => anyhow::bail!(
            "the new binary speaks protocol {p}, older than the queen's {ours}: install a binary as new as the queen's"
        ),
        Some(_) => {}
        None => {
            println!("  (the new binary's protocol is unknown here: it cannot run on this machine)")
        }
    }
    let name = hive_id(&ssh, &target)?;
    let systemd = service_enabled(&ssh, &target)?;
    step(&format!("stopping hive {name} and its workers"));
    if systemd {
        systemctl(&ssh, &target, &["stop", UNIT])?;
    } else {
        run_rbee(&ssh, &target, &["hive", "stop"])?;
    }
    let _ = wait_until(&client, &name, false, LEAVE_TIMEOUT).await;
    let copied = copy_binary(&ssh, &target, &binary);
    step(match copied {
        Ok(()) => "starting it again",
        Err(_) => "the copy failed: starting the old binary again",
    });
    let started = match systemd {
        true => systemctl(&ssh, &target, &["start", UNIT]),
        false => run_rbee(&ssh, &target, &["hive", "start"]).map(drop),
    };
    if let Err(e) = copied {
        let state = match started {
            Ok(()) => "the hive runs its old binary again".to_string(),
            Err(s) => format!("the hive is STOPPED and did not start again: {s:#}"),
        };
        return Err(e.context(format!("upgrade failed; {state}")));
    }
    started?;
    wait_until(&client, &name, true, JOIN_TIMEOUT).await?;
    let now = ssh.output(&[&target.path("bin/rbee"), "--version"])?;
    println!(
        "hive {name} upgraded from {} to {} and rejoined; its store was kept",
        installed.version,
        now.trim()
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn uninstall(settings: &Effective, args: UninstallArgs) -> anyhow::Result<ExitCode> {
    let ssh = Ssh::new(args.ssh)?;
    let target = preflight::run(&ssh, None)?;
    let name = hive_id(&ssh, &target).ok();
    match &target.installed {
        Some(_) => {
            if service_enabled(&ssh, &target)? {
                step(&format!("disabling and removing {UNIT}"));
                let mut args = vec!["hive", "uninstall-service"];
                if !target.root {
                    args.push("--user");
                }
                run_rbee(&ssh, &target, &args)?;
            } else {
                step("stopping the hive and its workers");
                run_rbee(&ssh, &target, &["hive", "stop"])?;
            }
        }
        None => println!("no rbee installed in {}", target.prefix),
    }
    if args.purge {
        // Only a directory that is rbee's: a mistyped --prefix must not delete a tree.
        let holds = |rel: &str| ssh.run(&["test", "-e", &target.path(rel)], Input::Nothing);
        anyhow::ensure!(
            holds("bin/rbee")?.ok() || holds("data/hive")?.ok(),
            "{} holds neither bin/rbee nor data/hive: not deleting a directory that is not rbee's",
            target.prefix
        );
        step(&format!("deleting {}", target.prefix));
        ssh.output(&["rm", "-rf", "--", &target.prefix])?;
        if let Some(name) = name {
            match settings.client().await {
                Ok(client) => {
                    client.remove_hive(&name).await?;
                    println!("hive {name} removed from the cluster");
                }
                Err(e) => println!("hive {name} stays in the cluster's registry: {e:#}"),
            }
        }
    } else {
        step("removing the binary and the join token (the store stays; --purge deletes it)");
        let (bin, staged) = (target.path("bin/rbee"), target.path("bin/.rbee.new"));
        ssh.output(&[
            "rm",
            "-f",
            "--",
            &bin,
            &staged,
            &target.path("data/hive.env"),
        ])?;
        ssh.run(&["rmdir", "--", &target.path("bin")], Input::Nothing)?;
    }
    println!("uninstalled from {}", ssh.args.target);
    Ok(ExitCode::SUCCESS)
}

pub async fn status(settings: &Effective, args: SshArgs) -> anyhow::Result<ExitCode> {
    let ssh = Ssh::new(args)?;
    let target = preflight::run(&ssh, None)?;
    let Some(installed) = &target.installed else {
        println!("no rbee installed in {}", target.prefix);
        return Ok(ExitCode::from(super::EXIT_UNREACHABLE));
    };
    let ours = rbee::transport::PROTOCOL_VERSION;
    if installed.protocol != Some(ours) {
        println!(
            "its {} does not speak this queen's protocol {ours}: `rbee hive upgrade --ssh {}`",
            installed.version, ssh.args.target
        );
    }
    let report = hive_status(&ssh, &target)?;
    let running = report["running"].as_bool().unwrap_or(false);
    let id = report["id"].as_str().unwrap_or("?").to_string();
    let how = if service_enabled(&ssh, &target)? {
        format!("as {UNIT}")
    } else {
        "in the background".into()
    };
    match running {
        true => println!(
            "hive {id} running {how} (pid {}), joined to the queen at {}",
            report["pid"], report["queen"]
        ),
        false => println!("hive {id} not running (installed {how})"),
    }
    match settings.client().await {
        Ok(client) => match client.hives().await?.into_iter().find(|h| h.id == id) {
            Some(h) => println!("the queen sees it {:?} from {}", h.state, h.addr),
            None => println!("the queen does not know a hive {id}"),
        },
        Err(e) => println!("the queen cannot be asked: {e:#}"),
    }
    Ok(if running {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_UNREACHABLE)
    })
}

/// Puts `binary` at `bin/rbee` under the prefix: written beside it, its SHA-256 compared,
/// then renamed over the old one (a running hive keeps its open copy).
fn copy_binary(ssh: &Ssh, target: &Target, binary: &Binary) -> anyhow::Result<()> {
    step(&format!(
        "copying rbee ({} MiB) to {}",
        binary.len >> 20,
        target.path("bin/rbee")
    ));
    let staged = target.path("bin/.rbee.new");
    ssh.output(&["mkdir", "-p", "--", &target.path("bin")])?;
    ssh.run(
        &["install", "-m", "755", "/dev/stdin", &staged],
        Input::File(&binary.path),
    )?
    .output("copying the binary")?;
    let sum = ssh.output(&["sha256sum", "--", &staged])?;
    if sum.split_whitespace().next() != Some(binary.sha256.as_str()) {
        let _ = ssh.run(&["rm", "-f", "--", &staged], Input::Nothing);
        anyhow::bail!("the copied binary's SHA-256 differs from this one's; nothing was replaced");
    }
    ssh.output(&["mv", "-f", "--", &staged, &target.path("bin/rbee")])?;
    Ok(())
}

/// Runs the installed `rbee ARGS` there.
fn rbee_there(ssh: &Ssh, target: &Target, args: &[&str]) -> Result<ssh::Ran, ssh::SshError> {
    let argv = target.rbee(args);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    ssh.run(&argv, Input::Nothing)
}

/// Runs the installed `rbee ARGS` there and wants it to succeed; its stdout.
fn run_rbee(ssh: &Ssh, target: &Target, args: &[&str]) -> anyhow::Result<String> {
    rbee_there(ssh, target, args)?.output(&format!("rbee {}", args.join(" ")))
}

/// What `rbee hive status --json` says there (it exits 3 when the hive is stopped, with
/// its report all the same).
fn hive_status(ssh: &Ssh, target: &Target) -> anyhow::Result<serde_json::Value> {
    let ran = rbee_there(ssh, target, &["hive", "status", "--json"])?;
    serde_json::from_str(ran.stdout.trim()).with_context(|| {
        format!(
            "unexpected `rbee hive status` output: {}",
            ran.stderr.trim()
        )
    })
}

/// The name a hive there joined as, from the file it wrote then (which outlives the
/// binary); `None` when none joined.
fn joined_name(ssh: &Ssh, target: &Target) -> anyhow::Result<Option<String>> {
    let joined = ssh.run(
        &["cat", "--", &target.path("data/hive/queen.json")],
        Input::Nothing,
    )?;
    Ok(serde_json::from_str::<serde_json::Value>(&joined.stdout)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string)))
}

/// The node id of the hive installed there (hives of older releases wrote no name: their
/// status has it).
fn hive_id(ssh: &Ssh, target: &Target) -> anyhow::Result<String> {
    if let Some(id) = joined_name(ssh, target)? {
        return Ok(id);
    }
    let report = hive_status(ssh, target)?;
    report["id"]
        .as_str()
        .map(str::to_string)
        .context("the hive there has not joined a cluster")
}

/// `systemctl [--user] ARGS`: the user's manager for a non-root login.
fn systemctl_argv<'a>(target: &Target, args: &[&'a str]) -> Vec<&'a str> {
    let mut argv = vec!["systemctl"];
    if !target.root {
        argv.push("--user");
    }
    argv.extend(args);
    argv
}

/// Whether the hive there runs as an enabled systemd unit.
fn service_enabled(ssh: &Ssh, target: &Target) -> anyhow::Result<bool> {
    if !target.systemd {
        return Ok(false);
    }
    let argv = systemctl_argv(target, &["is-enabled", "--quiet", UNIT]);
    Ok(ssh.run(&argv, Input::Nothing)?.ok())
}

fn systemctl(ssh: &Ssh, target: &Target, args: &[&str]) -> anyhow::Result<()> {
    ssh.output(&systemctl_argv(target, args)).map(drop)
}

/// Waits until the queen sees hive `name` connected (`connected`) or not.
async fn wait_until(
    client: &rbee::Client,
    name: &str,
    connected: bool,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let hives = client.hives().await?;
        let up = hives
            .iter()
            .any(|h| h.id == name && h.state == HiveState::Connected);
        if up == connected {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "hive {name} is {} the queen after {within:?}; its log is data/hive/hive.log under the prefix",
            if connected {
                "still not connected to"
            } else {
                "still connected to"
            }
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
