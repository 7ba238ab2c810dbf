//! The checks before any remote operation changes anything: reachable, authenticated (and
//! the host key known), platform, an rbee already there, free disk, latency. Each check
//! prints one line; the first that fails stops the operation with its reason.

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use super::ssh::{Input, Ssh};

/// How long the TCP check waits.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for the log, the identity and a second copy of the binary during an upgrade.
const SPARE_BYTES: u64 = 64 << 20;

/// The rbee binary to put on the machine.
pub struct Binary {
    pub path: PathBuf,
    pub len: u64,
    pub sha256: String,
    /// Its CPU architecture, as `uname -m` names it.
    pub arch: &'static str,
}

impl Binary {
    pub fn read(path: &Path) -> anyhow::Result<Binary> {
        let context = || path.display().to_string();
        let mut header = [0u8; 20];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut header))
            .with_context(context)?;
        let arch = elf_arch(&header)
            .with_context(|| format!("{} is not a Linux executable rbee knows", path.display()))?;
        Ok(Binary {
            path: path.to_path_buf(),
            len: std::fs::metadata(path).with_context(context)?.len(),
            sha256: rbee::actors::checksum::sha256_file(path, &mut |_| {}).with_context(context)?,
            arch,
        })
    }
}

/// The architecture in an ELF header (little-endian 64-bit only: what rbee builds for).
fn elf_arch(bytes: &[u8]) -> Option<&'static str> {
    let header = bytes.get(..20)?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return None;
    }
    match u16::from_le_bytes([header[18], header[19]]) {
        62 => Some("x86_64"),
        183 => Some("aarch64"),
        243 => Some("riscv64"),
        _ => None,
    }
}

/// An rbee found on the machine.
#[derive(Debug, Clone)]
pub struct Installed {
    /// What its `--version` printed.
    pub version: String,
    pub protocol: Option<u32>,
}

/// What the checks learned of the machine.
#[derive(Debug)]
pub struct Target {
    /// Absolute directory rbee lives in there.
    pub prefix: String,
    /// Its host name, sanitised into a node id.
    pub node_name: String,
    pub root: bool,
    /// Whether systemd runs the machine (else daemons start in the background).
    pub systemd: bool,
    pub installed: Option<Installed>,
}

impl Target {
    pub fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.prefix)
    }

    /// `rbee ARGS` there, with its data and cache under the prefix.
    pub fn rbee<'a>(&'a self, args: &[&'a str]) -> Vec<String> {
        let mut argv = vec![
            "env".to_string(),
            format!("RBEE_HOME={}", self.path("data")),
            format!("RBEE_CACHE={}", self.path("cache")),
            self.path("bin/rbee"),
        ];
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }
}

fn line(ok: bool, check: &str, detail: &str) {
    println!(
        "  {:<5} {check:<14} {detail}",
        if ok { "ok" } else { "FAIL" }
    );
}

/// Runs one check, printing its line; its value, or its failure with the check's name.
fn check<T>(name: &str, run: impl FnOnce() -> anyhow::Result<(T, String)>) -> anyhow::Result<T> {
    match run() {
        Ok((value, detail)) => {
            line(true, name, &detail);
            Ok(value)
        }
        Err(e) => {
            line(false, name, &format!("{e:#}"));
            Err(e.context(format!(
                "preflight check `{name}` failed; nothing was changed"
            )))
        }
    }
}

/// Runs every check (the platform and disk ones only with the `binary` to install).
pub fn run(ssh: &Ssh, binary: Option<&Binary>) -> anyhow::Result<Target> {
    let port = ssh.port();
    println!("preflight of {} (port {port})", ssh.args.target);
    check("reachable", || {
        if ssh.proxied {
            return Ok((
                (),
                "through ssh's configured proxy (checked by the login)".into(),
            ));
        }
        let addrs: Vec<_> = (ssh.host.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("cannot resolve {}", ssh.host))?
            .collect();
        let addr = addrs.first().context("the host name has no address")?;
        let started = Instant::now();
        TcpStream::connect_timeout(addr, REACH_TIMEOUT)
            .with_context(|| format!("cannot reach {addr}"))?;
        Ok(((), format!("{addr}, TCP connect {:?}", started.elapsed())))
    })?;
    let home = check("authenticated", || {
        let ran = ssh.run(&["pwd"], Input::Nothing)?;
        let took = ran.took;
        let home = ran.output("pwd")?.trim().to_string();
        Ok((
            home,
            format!("ssh round trip (connect, log in, run) {took:.0?}"),
        ))
    })?;
    let prefix = prefix_there(ssh.args.prefix.as_deref().unwrap_or(".rbee"), &home)?;
    let target = check("platform", || {
        let uname = ssh.output(&["uname", "-s", "-n", "-m"])?;
        let words: Vec<&str> = uname.split_whitespace().collect();
        let [os, node, arch] = words[..] else {
            anyhow::bail!("unexpected `uname` output {uname:?}");
        };
        anyhow::ensure!(os == "Linux", "{os}: rbee's hives run on Linux only");
        if let Some(binary) = binary {
            let arch = if arch == "arm64" { "aarch64" } else { arch };
            anyhow::ensure!(
                arch == binary.arch,
                "the machine is {arch} and this rbee binary is {}: pass --binary with an {arch} build",
                binary.arch
            );
        }
        anyhow::ensure!(
            !prefix.contains(|c: char| c.is_whitespace() || c.is_control()),
            "the prefix {prefix:?} holds whitespace, which service units cannot name"
        );
        let root = ssh.output(&["id", "-u"])?.trim() == "0";
        let booted = ssh
            .run(&["test", "-d", "/run/systemd/system"], Input::Nothing)?
            .ok();
        // A user unit outlives the login only with lingering (`loginctl enable-linger`):
        // without it the user's manager stops it after the session, so the hive runs as a
        // background daemon instead.
        let lingers = || -> anyhow::Result<bool> {
            let user = ssh.output(&["id", "-un"])?;
            let ran = ssh.run(
                &[
                    "loginctl",
                    "show-user",
                    "--property=Linger",
                    "--value",
                    user.trim(),
                ],
                Input::Nothing,
            )?;
            Ok(ran.ok() && ran.stdout.trim() == "yes")
        };
        let systemd = booted && (root || lingers()?);
        let manager = match (booted, systemd) {
            (true, true) => "systemd",
            (true, false) => {
                "systemd without lingering for this login (daemons start in the background)"
            }
            _ => "no systemd (daemons start in the background)",
        };
        let detail = format!(
            "{os} {arch}, host {node}, {} user, {manager}",
            if root { "root" } else { "unprivileged" },
        );
        let target = Target {
            prefix: prefix.clone(),
            node_name: node_id_from(node),
            root,
            systemd,
            installed: None,
        };
        Ok((target, detail))
    })?;
    let installed = check("existing rbee", || {
        let ran = ssh.run(&[&target.path("bin/rbee"), "--version"], Input::Nothing)?;
        if !ran.ok() {
            return Ok((None, format!("none in {}", target.prefix)));
        }
        let version = ran.stdout.trim().to_string();
        let installed = Installed {
            protocol: protocol_of(&version),
            version: version.clone(),
        };
        Ok((Some(installed), format!("{version} in {}", target.prefix)))
    })?;
    if let Some(binary) = binary {
        check("free disk", || {
            let needed = 2 * binary.len + SPARE_BYTES;
            let (dir, free) = free_bytes(ssh, &target.prefix)?;
            let detail = format!("{} free at {dir}, {} needed", mib(free), mib(needed));
            anyhow::ensure!(free >= needed, "{detail}: the disk is too full");
            Ok(((), detail))
        })?;
    }
    Ok(Target {
        installed,
        ..target
    })
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// The absolute prefix `given` names on a machine whose login starts in `home`. The root
/// and the home directory themselves are refused: `uninstall --purge` deletes the prefix.
fn prefix_there(given: &str, home: &str) -> anyhow::Result<String> {
    let home = home.trim_end_matches('/');
    let given = given.trim_end_matches('/');
    let prefix = match given.starts_with('/') {
        true => given.to_string(),
        false if given.is_empty() || given == "." => home.to_string(),
        false => format!("{home}/{given}"),
    };
    anyhow::ensure!(
        !prefix.is_empty() && prefix != home && !prefix.split('/').any(|p| p == ".."),
        "--prefix {given:?}: rbee needs a directory of its own (not / or the home directory; no '..')"
    );
    Ok(prefix)
}

/// Free bytes on the file system of `dir`, or of its nearest existing parent.
fn free_bytes(ssh: &Ssh, dir: &str) -> anyhow::Result<(String, u64)> {
    let mut at = Path::new(dir);
    loop {
        let text = at.to_string_lossy();
        let ran = ssh.run(&["df", "-Pk", "--", &text], Input::Nothing)?;
        if ran.ok() {
            let available = ran
                .stdout
                .lines()
                .nth(1)
                .and_then(|row| row.split_whitespace().nth(3))
                .and_then(|kib| kib.parse::<u64>().ok())
                .with_context(|| format!("unexpected `df` output {:?}", ran.stdout))?;
            return Ok((text.into_owned(), available * 1024));
        }
        at = at
            .parent()
            .context("`df` fails on every parent directory")?;
    }
}

/// The protocol in a `--version` line (`rbee 0.1.0 (protocol 2)`); older builds print none.
pub fn protocol_of(version: &str) -> Option<u32> {
    let (_, rest) = version.split_once("(protocol ")?;
    rest.split(')').next()?.trim().parse().ok()
}

/// A host name as a node id: anything but letters, digits and `-` becomes `-`.
pub fn node_id_from(host: &str) -> String {
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_architecture_comes_from_the_elf_header_and_anything_else_is_refused() {
        let me = Binary::read(&std::env::current_exe().unwrap()).unwrap();
        assert_eq!(me.arch, std::env::consts::ARCH);
        let mut elf = b"\x7fELF\x02\x01".to_vec();
        elf.resize(20, 0);
        elf[18] = 183;
        assert_eq!(elf_arch(&elf), Some("aarch64"));
        elf[4] = 1; // 32-bit
        assert_eq!(elf_arch(&elf), None);
        assert_eq!(elf_arch(b"#!/bin/sh\n"), None);
        assert_eq!(elf_arch(b""), None);
    }

    #[test]
    fn the_prefix_is_a_directory_of_its_own() {
        assert_eq!(prefix_there(".rbee", "/home/u").unwrap(), "/home/u/.rbee");
        assert_eq!(prefix_there("/opt/rbee/", "/root").unwrap(), "/opt/rbee");
        for bad in ["", ".", "/", "/home/u", "/home/u/", "a/../..", "/opt/../"] {
            assert!(prefix_there(bad, "/home/u").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_protocol_is_read_from_the_version_line() {
        assert_eq!(protocol_of("rbee 0.1.0 (protocol 2)"), Some(2));
        assert_eq!(protocol_of("rbee 0.1.0"), None);
        assert_eq!(protocol_of("rbee 0.1.0 (protocol x)"), None);
        assert_eq!(node_id_from("gpu_1.lan"), "gpu-1-lan");
    }
}
