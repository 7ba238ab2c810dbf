//! systemd units for the daemons: `rbee queen install-service` and `rbee hive
//! install-service` write a unit that runs this binary in the foreground with the
//! arguments given, restarts it on failure, logs to the journal and confines it to its
//! data and cache directories; then they enable and start it. Every `systemctl` call is an
//! argument vector; every argument of `ExecStart` is quoted for systemd.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context;
use clap::Args;

/// Where and how to install a unit.
#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// A user unit (`systemctl --user`, in `~/.config/systemd/user`) instead of a system
    /// one (`/etc/systemd/system`, needs root).
    #[arg(long)]
    user: bool,
    /// Write the unit (and reload systemd) but neither enable nor start it.
    #[arg(long)]
    no_start: bool,
    /// Write the unit into this directory instead, and leave systemd alone (to inspect it,
    /// or for an image).
    #[arg(long)]
    unit_dir: Option<PathBuf>,
}

/// Flags of `install-service` itself, not passed on to the daemon (with whether each
/// takes a value).
const INSTALL_FLAGS: &[(&str, bool)] = &[
    ("--user", false),
    ("--no-start", false),
    ("--unit-dir", true),
];

/// Which daemon a unit runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Queen,
    Hive,
}

impl Daemon {
    fn name(self) -> &'static str {
        match self {
            Daemon::Queen => "queen",
            Daemon::Hive => "hive",
        }
    }

    /// The unit's file name.
    pub fn unit_name(self) -> String {
        format!("rbee-{}.service", self.name())
    }
}

/// What a unit is made of.
#[derive(Debug, Clone)]
pub struct Unit {
    pub daemon: Daemon,
    /// The rbee binary.
    pub exe: PathBuf,
    /// Arguments after the binary (`queen serve …`).
    pub args: Vec<OsString>,
    /// Where relative paths among them point from: the directory it was installed from.
    pub workdir: PathBuf,
    /// `RBEE_HOME` and `RBEE_CACHE`: with `writable`, the only directories it may write.
    pub home: PathBuf,
    pub cache: PathBuf,
    /// Other directories it writes (a queen's `--data` outside `RBEE_HOME`).
    pub writable: Vec<PathBuf>,
    /// A file of `KEY=value` lines with secrets (a join token), readable by root only.
    pub environment_file: Option<PathBuf>,
    pub user: bool,
}

/// One `ExecStart` argument as systemd reads it: double-quoted, with `\`, `"`, `%` and
/// `$` escaped so systemd neither splits nor expands it.
pub fn quote(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('"');
    for c in arg.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A path in a setting that takes paths (no quoting there: specifiers escaped only).
fn path_value(path: &Path) -> anyhow::Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    anyhow::ensure!(
        !text.contains(char::is_whitespace),
        "{text}: systemd path settings cannot hold whitespace"
    );
    Ok(text.replace('%', "%%"))
}

impl Unit {
    /// The unit file's text.
    pub fn render(&self) -> anyhow::Result<String> {
        let exe = self
            .exe
            .to_str()
            .with_context(|| format!("{} is not UTF-8", self.exe.display()))?;
        let mut exec = vec![quote(exe)];
        for arg in &self.args {
            let arg = arg
                .to_str()
                .with_context(|| format!("argument {arg:?} is not UTF-8"))?;
            exec.push(quote(arg));
        }
        let (home, cache) = (path_value(&self.home)?, path_value(&self.cache)?);
        let name = self.daemon.name();
        let mut text = format!(
            "# Written by `rbee {name} install-service`.\n\
             [Unit]\n\
             Description=rbee {name} (LLM inference cluster)\n\
             After=network-online.target\n\
             Wants=network-online.target\n\
             \n\
             [Service]\n\
             Type=simple\n\
             WorkingDirectory={}\n\
             ExecStart={}\n\
             Environment=RBEE_HOME={home}\n\
             Environment=RBEE_CACHE={cache}\n",
            path_value(&self.workdir)?,
            exec.join(" ")
        );
        if let Some(file) = &self.environment_file {
            text.push_str(&format!("EnvironmentFile={}\n", path_value(file)?));
        }
        // SIGTERM is a graceful stop: the queen closes its links (hives wait for the next
        // one), the hive drains and stops its workers. A hive's worker processes are its
        // own to stop: when it crashes they run on and the restarted hive adopts them, so
        // systemd signals only the hive itself.
        let kill_mode = match self.daemon {
            Daemon::Queen => "mixed",
            Daemon::Hive => "process",
        };
        text.push_str(&format!("KillMode={kill_mode}\n"));
        text.push_str(
            "Restart=on-failure\n\
             RestartSec=2\n\
             TimeoutStopSec=60\n\
             StandardOutput=journal\n\
             StandardError=journal\n\
             NoNewPrivileges=yes\n",
        );
        if !self.user {
            // A user manager cannot always set up mount namespaces; a system one can.
            let mut writable = vec![home, cache];
            for dir in &self.writable {
                writable.push(path_value(dir)?);
            }
            text.push_str(&format!(
                "PrivateTmp=yes\n\
                 ProtectSystem=strict\n\
                 ProtectHome=read-only\n\
                 ReadWritePaths={}\n",
                writable.join(" ")
            ));
        }
        let target = if self.user {
            "default.target"
        } else {
            "multi-user.target"
        };
        text.push_str(&format!("\n[Install]\nWantedBy={target}\n"));
        Ok(text)
    }
}

/// This process's arguments with `install-service` turned into `serve` and the flags of
/// `install-service` (and `drop`, flags whose values go elsewhere) left out.
pub fn daemon_args(drop: &[&str]) -> Vec<OsString> {
    forwarded(std::env::args_os().skip(1), drop)
}

/// [`daemon_args`] of the arguments `args` (the program name left out).
fn forwarded(args: impl IntoIterator<Item = OsString>, drop: &[&str]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    let mut replaced = false;
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().to_string();
        let (flag, inline) = match text.split_once('=') {
            Some((flag, _)) => (flag.to_string(), true),
            None => (text.clone(), false),
        };
        if let Some((_, takes_value)) = INSTALL_FLAGS.iter().find(|(f, _)| *f == flag) {
            if *takes_value && !inline {
                args.next();
            }
            continue;
        }
        if drop.contains(&flag.as_str()) {
            if !inline {
                args.next();
            }
            continue;
        }
        // Only the subcommand itself: a value spelled the same (`--name install-service`)
        // passes as given.
        out.push(if !replaced && text == "install-service" {
            replaced = true;
            OsString::from("serve")
        } else {
            arg
        });
    }
    out
}

fn unit_dir(install: &InstallArgs) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &install.unit_dir {
        return Ok(dir.clone());
    }
    if install.user {
        let config = dirs::config_dir().context("no configuration directory for user units")?;
        Ok(config.join("systemd").join("user"))
    } else {
        Ok(PathBuf::from("/etc/systemd/system"))
    }
}

/// Writes `content` to `path` readable by its owner only: a file of its own (never
/// following a link planted there), made 0600 before anything is written, renamed over
/// whatever was there.
fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    let temp = dir.join(format!(
        ".{}.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("env"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temp)
        .with_context(|| temp.display().to_string())?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| temp.display().to_string())?;
    file.write_all(content.as_bytes())
        .with_context(|| temp.display().to_string())?;
    std::fs::rename(&temp, path).with_context(|| path.display().to_string())
}

/// A system unit runs as root: refuse a binary anyone but root could replace.
fn check_root_binary(exe: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(exe).with_context(|| exe.display().to_string())?;
    anyhow::ensure!(
        meta.uid() == 0 && meta.mode() & 0o022 == 0,
        "{} is not a root-owned binary only root can write, and a system unit runs it as \
         root: install it first (e.g. `install -m 755 {} /usr/local/bin/rbee`) and run \
         install-service from there, or use --user",
        exe.display(),
        exe.display()
    );
    Ok(())
}

fn systemctl(user: bool, args: &[&str]) -> anyhow::Result<()> {
    let mut command = Command::new("systemctl");
    if user {
        command.arg("--user");
    }
    let status = command
        .args(args)
        .status()
        .context("cannot run systemctl (is this a systemd machine?)")?;
    anyhow::ensure!(
        status.success(),
        "systemctl {} failed: {status}",
        args.join(" ")
    );
    Ok(())
}

/// Writes the unit of `daemon` running `args`, with `secrets` (`KEY=value` lines) in an
/// environment file beside the data, then enables and starts it unless told not to.
pub fn install(
    daemon: Daemon,
    args: Vec<OsString>,
    secrets: Option<String>,
    writable: Vec<PathBuf>,
    install: &InstallArgs,
) -> anyhow::Result<ExitCode> {
    // systemd ignores relative paths in ReadWritePaths.
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let home = absolute(rbee::actors::paths::data_dir());
    let cache = absolute(rbee::actors::paths::cache_dir());
    // ReadWritePaths must exist when the unit starts.
    for dir in [&home, &cache].into_iter().chain(&writable) {
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    }
    let writable = writable
        .into_iter()
        .map(|d| std::path::absolute(&d).unwrap_or(d))
        .filter(|d| !d.starts_with(&home) && !d.starts_with(&cache))
        .collect();
    let environment_file = match secrets {
        Some(secrets) => {
            let path = home.join(format!("{}.env", daemon.name()));
            write_private(&path, &secrets)?;
            Some(path)
        }
        None => None,
    };
    let exe = std::env::current_exe().context("cannot find this rbee binary")?;
    if !install.user && install.unit_dir.is_none() {
        check_root_binary(&exe)?;
    }
    // A system unit's /tmp is private: a directory there would not exist for it.
    let workdir = std::env::current_dir().context("no current directory")?;
    let workdir = match !install.user && workdir.starts_with("/tmp") {
        true => PathBuf::from("/"),
        false => workdir,
    };
    let unit = Unit {
        daemon,
        exe,
        args,
        workdir,
        home,
        cache,
        writable,
        environment_file,
        user: install.user,
    };
    let dir = unit_dir(install)?;
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let path = dir.join(daemon.unit_name());
    std::fs::write(&path, unit.render()?).with_context(|| path.display().to_string())?;
    println!("wrote {}", path.display());
    if install.unit_dir.is_some() {
        return Ok(ExitCode::SUCCESS);
    }
    systemctl(install.user, &["daemon-reload"])?;
    if install.no_start {
        return Ok(ExitCode::SUCCESS);
    }
    systemctl(install.user, &["enable", "--now", &daemon.unit_name()])?;
    let journal = if install.user {
        "journalctl --user"
    } else {
        "journalctl"
    };
    println!(
        "{} enabled and started; its log: {journal} -u {}",
        daemon.unit_name(),
        daemon.unit_name()
    );
    Ok(ExitCode::SUCCESS)
}

/// Disables and stops the unit [`install`] wrote, deletes it and its environment file,
/// and reloads systemd.
pub fn uninstall(daemon: Daemon, user: bool) -> anyhow::Result<ExitCode> {
    let install = InstallArgs {
        user,
        no_start: false,
        unit_dir: None,
    };
    let path = unit_dir(&install)?.join(daemon.unit_name());
    if !path.exists() {
        println!("no {} to remove", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    systemctl(user, &["disable", "--now", &daemon.unit_name()])?;
    std::fs::remove_file(&path).with_context(|| path.display().to_string())?;
    let secrets = rbee::actors::paths::data_dir().join(format!("{}.env", daemon.name()));
    let _ = std::fs::remove_file(secrets);
    systemctl(user, &["daemon-reload"])?;
    println!("{} disabled, stopped and removed", path.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_arguments_are_quoted_so_systemd_neither_splits_nor_expands_them() {
        assert_eq!(quote("plain"), "\"plain\"");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("$HOME %h \"x\" \\"), "\"$$HOME %%h \\\"x\\\" \\\\\"");
    }

    #[test]
    fn a_system_unit_is_confined_to_its_directories_and_a_user_unit_is_not_namespaced() {
        let unit = Unit {
            daemon: Daemon::Hive,
            exe: "/usr/local/bin/rbee".into(),
            args: vec![
                "hive".into(),
                "serve".into(),
                "--name".into(),
                "gpu 1".into(),
            ],
            workdir: "/".into(),
            home: "/var/lib/rbee".into(),
            cache: "/var/cache/rbee".into(),
            writable: vec!["/srv/queen".into()],
            environment_file: Some("/var/lib/rbee/hive.env".into()),
            user: false,
        };
        let text = unit.render().unwrap();
        assert!(text.contains(
            "ExecStart=\"/usr/local/bin/rbee\" \"hive\" \"serve\" \"--name\" \"gpu 1\"\n"
        ));
        assert!(text.contains("ReadWritePaths=/var/lib/rbee /var/cache/rbee /srv/queen\n"));
        assert!(text.contains("EnvironmentFile=/var/lib/rbee/hive.env\n"));
        assert!(text.contains("WantedBy=multi-user.target"));
        let user = Unit { user: true, ..unit }.render().unwrap();
        assert!(!user.contains("ProtectSystem") && user.contains("WantedBy=default.target"));
        let spaced = Unit {
            home: "/var/lib/my rbee".into(),
            ..Unit {
                user: true,
                ..unit_for_test()
            }
        };
        assert!(spaced.render().is_err(), "a path with a space is refused");
    }

    #[test]
    fn install_flags_and_dropped_ones_are_left_out_and_only_the_subcommand_becomes_serve() {
        let args = [
            "hive",
            "install-service",
            "--join=SECRET",
            "--unit-dir",
            "/tmp/u",
            "--user",
            "--name",
            "install-service",
            "--join",
            "SECRET",
            "--no-start",
            "--unit-dir=/x",
        ];
        let got = forwarded(args.map(OsString::from), &["--join"]);
        assert_eq!(
            got,
            ["hive", "serve", "--name", "install-service"].map(OsString::from)
        );
    }

    fn unit_for_test() -> Unit {
        Unit {
            daemon: Daemon::Queen,
            exe: "/usr/bin/rbee".into(),
            args: Vec::new(),
            workdir: "/".into(),
            home: "/h".into(),
            cache: "/c".into(),
            writable: Vec::new(),
            environment_file: None,
            user: false,
        }
    }
}
