//! A second network for the fault tests: a network namespace joined to this one by a veth
//! pair, made by the test itself and removed when dropped. A hive started inside it (with
//! its workers) is a machine the test can cut off the network and reconnect.

use std::process::Command;

/// A namespace `ns` with address `inner` on its end of the pair; `outer` is this side's.
pub struct Netns {
    pub name: String,
    pub outer: String,
    pub inner: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Makes the namespace and the pair, or says why this machine does not allow it.
    pub fn create() -> Result<Netns, String> {
        let id = std::process::id();
        // A /30 of 10.213.0.0/16 per test process, so parallel runs do not collide.
        let (a, b) = ((id >> 6) & 0xff, (id & 0x3f) << 2);
        let netns = Netns {
            name: format!("rbee-fault-{id}"),
            outer: format!("10.213.{a}.{}", b + 1),
            inner: format!("10.213.{a}.{}", b + 2),
        };
        let (host_if, ns_if) = (format!("rbf{id}h"), format!("rbf{id}n"));
        ip(&["netns", "add", &netns.name])?;
        // From here on, dropping `netns` removes what was made.
        ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
            "netns",
            &netns.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", netns.outer),
            "dev",
            &host_if,
        ])?;
        ip(&["link", "set", &host_if, "up"])?;
        let inner = format!("{}/30", netns.inner);
        netns.exec_ip(&["addr", "add", &inner, "dev", &ns_if])?;
        netns.exec_ip(&["link", "set", &ns_if, "up"])?;
        netns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    fn exec_ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend(args);
        ip(&all)
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Drops every packet between the two sides, silently (blackhole routes both ways):
    /// as a cut cable, nobody is told.
    pub fn cut(&self) {
        ip(&["route", "add", "blackhole", &format!("{}/32", self.inner)]).unwrap();
        self.exec_ip(&["route", "add", "blackhole", &format!("{}/32", self.outer)])
            .unwrap();
    }

    /// Undoes [`Netns::cut`].
    pub fn heal(&self) {
        ip(&["route", "del", "blackhole", &format!("{}/32", self.inner)]).unwrap();
        self.exec_ip(&["route", "del", "blackhole", &format!("{}/32", self.outer)])
            .unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it this end.
        let _ = ip(&["route", "del", "blackhole", &format!("{}/32", self.inner)]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
