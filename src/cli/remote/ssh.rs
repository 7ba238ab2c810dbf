//! The system OpenSSH client, driven one command at a time. Chosen over a Rust SSH library
//! because it is on every machine an operator reaches over SSH and honours what they set
//! up already (agents, `~/.ssh/config`, jump hosts, hardware keys), and because host-key
//! checking stays its well-reviewed code. Every remote command is an argument vector that
//! this module quotes for the remote POSIX shell; no shell text is ever built from input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;

/// How long ssh may take to connect.
const CONNECT_TIMEOUT_SECS: u32 = 10;

/// Which machine to reach, and how.
#[derive(Debug, Clone, Args)]
pub struct SshArgs {
    /// The machine: `[USER@]HOST`.
    #[arg(long = "ssh", value_name = "[USER@]HOST")]
    pub target: String,
    /// Its SSH port (default: ssh's configuration for the host, else 22).
    #[arg(long)]
    pub port: Option<u16>,
    /// The private key to log in with (else ssh's defaults and agent).
    #[arg(long)]
    pub identity_file: Option<PathBuf>,
    /// The known-hosts file to check its host key against (else ssh's default).
    #[arg(long)]
    pub known_hosts: Option<PathBuf>,
    /// Pin the host key if this machine has never seen the host (a changed key is still
    /// refused).
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// The directory rbee lives in there: `bin/rbee`, the store and data under `data`,
    /// the cache under `cache` (default: `.rbee` in the login's home directory).
    #[arg(long, value_name = "DIR")]
    pub prefix: Option<String>,
}

/// Why a remote command could not run (as opposed to running and failing).
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(
        "the host key of {0} is not in the known-hosts file: check it and pass --accept-new-host-key to pin it"
    )]
    UnknownHostKey(String),
    #[error(
        "the host key of {0} CHANGED since it was pinned: someone may be intercepting, or the machine was reinstalled; fix the known-hosts entry by hand"
    )]
    ChangedHostKey(String),
    #[error("{0} refused the login (wrong key or user?): {1}")]
    Authentication(String, String),
    #[error("cannot reach {0}: {1}")]
    Unreachable(String, String),
    #[error("ssh to {0} failed: {1}")]
    Other(String, String),
    #[error("cannot run ssh (is the OpenSSH client installed?): {0}")]
    NoClient(std::io::Error),
    #[error("cannot read what to send: {0}")]
    NoInput(std::io::Error),
}

/// What a remote command did.
#[derive(Debug)]
pub struct Ran {
    /// Its exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Its stdout, or an error that carries its stderr.
    pub fn output(self, what: &str) -> anyhow::Result<String> {
        anyhow::ensure!(
            self.ok(),
            "{what} failed (exit {}): {}",
            self.code.map_or("by signal".into(), |c| c.to_string()),
            self.stderr.trim()
        );
        Ok(self.stdout)
    }
}

/// What a remote command reads on its stdin.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Nothing,
    Bytes(&'a [u8]),
    /// A file, streamed (a binary of hundreds of MiB is never held in memory).
    File(&'a Path),
}

/// One machine reached over SSH.
#[derive(Debug, Clone)]
pub struct Ssh {
    pub args: SshArgs,
    /// The host ssh connects to (its configuration's `HostName` for an alias).
    pub host: String,
    /// The port it connects to.
    port: u16,
    /// Whether it goes through a `ProxyJump` or `ProxyCommand` (no direct TCP check).
    pub proxied: bool,
}

impl Ssh {
    /// Checks the target's syntax: a user or host that starts with `-` would be read by
    /// ssh as an option.
    pub fn new(args: SshArgs) -> anyhow::Result<Ssh> {
        let (user, host) = match args.target.rsplit_once('@') {
            Some((user, host)) => (Some(user), host),
            None => (None, args.target.as_str()),
        };
        let fine = |s: &str, extra: &str| {
            !s.is_empty()
                && !s.starts_with('-')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c) || extra.contains(c))
        };
        anyhow::ensure!(
            fine(host, ":[]") && user.is_none_or(|u| fine(u, "")),
            "--ssh {:?}: expected [USER@]HOST (letters, digits, '-', '.', '_'; an IPv6 address in brackets)",
            args.target
        );
        if let Some(file) = &args.known_hosts {
            anyhow::ensure!(
                !file.to_string_lossy().contains(char::is_whitespace),
                "--known-hosts {}: ssh would split a path with whitespace into several files",
                file.display()
            );
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let mut ssh = Ssh {
            port: args.port.unwrap_or(22),
            args,
            host,
            proxied: false,
        };
        ssh.resolve();
        Ok(ssh)
    }

    /// What ssh's configuration makes of the target (`ssh -G`): its real host name, port
    /// and proxy; without an answer, the target as given.
    fn resolve(&mut self) {
        let mut probe = Command::new("ssh");
        probe.arg("-G");
        if let Some(port) = self.args.port {
            probe.arg("-p").arg(port.to_string());
        }
        let Ok(out) = probe.arg("--").arg(&self.args.target).output() else {
            return;
        };
        if !out.status.success() {
            return;
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            match line.split_once(' ') {
                Some(("hostname", v)) => {
                    self.host = v.trim_start_matches('[').trim_end_matches(']').to_string()
                }
                Some(("port", v)) => self.port = v.parse().unwrap_or(self.port),
                Some(("proxyjump" | "proxycommand", v)) if v != "none" => self.proxied = true,
                _ => {}
            }
        }
    }

    /// The port ssh connects to.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn base(&self) -> Command {
        let mut ssh = Command::new("ssh");
        let checking = if self.args.accept_new_host_key {
            "StrictHostKeyChecking=accept-new"
        } else {
            "StrictHostKeyChecking=yes"
        };
        ssh.args(["-o", "BatchMode=yes", "-o", checking, "-o"])
            .arg(format!("ConnectTimeout={CONNECT_TIMEOUT_SECS}"));
        // Quiet, except that pinning a new host key says which key it pinned.
        if !self.args.accept_new_host_key {
            ssh.args(["-o", "LogLevel=ERROR"]);
        }
        if let Some(port) = self.args.port {
            ssh.arg("-p").arg(port.to_string());
        }
        if let Some(file) = &self.args.identity_file {
            ssh.arg("-o").arg("IdentitiesOnly=yes").arg("-i").arg(file);
        }
        if let Some(file) = &self.args.known_hosts {
            ssh.arg("-o")
                .arg(format!("UserKnownHostsFile={}", file.display()));
        }
        ssh
    }

    /// Runs `argv` there, `stdin` fed to it; an [`SshError`] when ssh itself failed.
    pub fn run(&self, argv: &[&str], stdin: Input) -> Result<Ran, SshError> {
        let started = Instant::now();
        let mut ssh = self.base();
        ssh.arg("--")
            .arg(&self.args.target)
            .arg(command_line(argv))
            .stdin(match stdin {
                Input::Nothing => Stdio::null(),
                Input::Bytes(_) => Stdio::piped(),
                Input::File(path) => {
                    Stdio::from(std::fs::File::open(path).map_err(SshError::NoInput)?)
                }
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ssh.spawn().map_err(SshError::NoClient)?;
        let feeder = match stdin {
            Input::Bytes(bytes) => {
                let mut pipe = child.stdin.take().expect("piped");
                let bytes = bytes.to_vec();
                // A writer of its own: the remote side may answer before it read all.
                Some(std::thread::spawn(move || pipe.write_all(&bytes)))
            }
            _ => None,
        };
        let out = child.wait_with_output().map_err(SshError::NoClient)?;
        if let Some(feeder) = feeder {
            let _ = feeder.join();
        }
        let ran = Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        };
        // 255 is ssh's own failure; a remote command cannot tell it apart, but none of
        // ours exits with it.
        if ran.code == Some(255) {
            return Err(classify(&self.args.target, ran.stderr.trim()));
        }
        Ok(ran)
    }

    /// Runs `argv` and wants it to succeed; its stdout.
    pub fn output(&self, argv: &[&str]) -> anyhow::Result<String> {
        self.run(argv, Input::Nothing)?.output(&argv.join(" "))
    }
}

/// What ssh's message says went wrong.
fn classify(target: &str, stderr: &str) -> SshError {
    let target = target.to_string();
    let message = stderr.lines().last().unwrap_or("").to_string();
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
        SshError::ChangedHostKey(target)
    } else if stderr.contains("Host key verification failed")
        || stderr.contains("No ED25519 host key is known")
        || stderr.contains("host key is known")
    {
        SshError::UnknownHostKey(target)
    } else if stderr.contains("Permission denied") || stderr.contains("Too many authentication") {
        SshError::Authentication(target, message)
    } else if [
        "Connection refused",
        "timed out",
        "No route",
        "Could not resolve",
        "Network is unreachable",
    ]
    .iter()
    .any(|m| stderr.contains(m))
    {
        SshError::Unreachable(target, message)
    } else {
        SshError::Other(target, message)
    }
}

/// `s` as one word of the remote POSIX shell: in single quotes, each `'` closed, escaped
/// and reopened.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command line ssh hands to the remote shell: every argument quoted.
pub fn command_line(argv: &[&str]) -> String {
    argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(target: &str) -> SshArgs {
        SshArgs {
            target: target.into(),
            port: None,
            identity_file: None,
            known_hosts: None,
            accept_new_host_key: false,
            prefix: None,
        }
    }

    #[test]
    fn each_argument_reaches_the_remote_shell_as_one_literal_word() {
        assert_eq!(quote("plain"), "'plain'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(
            command_line(&["rm", "-f", "--", "a b; $(reboot) `x` \"q\""]),
            r#"'rm' '-f' '--' 'a b; $(reboot) `x` "q"'"#
        );
        // What a POSIX shell makes of it: the same words back.
        let words = ["a b", "it's", "$HOME", "*", "", "x\ny"];
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\0' {}", command_line(&words)))
            .output()
            .unwrap();
        let back: Vec<_> = out.stdout.split(|b| *b == 0).collect();
        assert_eq!(back.len(), words.len() + 1);
        for (word, got) in words.iter().zip(back) {
            assert_eq!(word.as_bytes(), got);
        }
    }

    #[test]
    fn a_target_that_ssh_would_read_as_an_option_is_refused() {
        assert!(Ssh::new(args("-oProxyCommand=touch /tmp/x")).is_err());
        assert!(Ssh::new(args("root@-oProxyCommand=x")).is_err());
        assert!(Ssh::new(args("-l@host")).is_err());
        assert!(Ssh::new(args("a b")).is_err());
        assert!(Ssh::new(args("")).is_err());
        assert_eq!(Ssh::new(args("root@gpu-1.lan")).unwrap().host, "gpu-1.lan");
        assert_eq!(Ssh::new(args("[::1]")).unwrap().host, "::1");
    }

    #[test]
    fn ssh_messages_become_the_failure_they_describe() {
        let t = "h";
        assert!(matches!(
            classify(t, "Host key verification failed."),
            SshError::UnknownHostKey(_)
        ));
        assert!(matches!(
            classify(
                t,
                "@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed."
            ),
            SshError::ChangedHostKey(_)
        ));
        assert!(matches!(
            classify(t, "root@127.0.0.1: Permission denied (publickey)."),
            SshError::Authentication(..)
        ));
        assert!(matches!(
            classify(
                t,
                "ssh: connect to host 127.0.0.1 port 1: Connection refused"
            ),
            SshError::Unreachable(..)
        ));
    }
}
