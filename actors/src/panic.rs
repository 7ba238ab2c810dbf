//! A panic hook that does not capture backtraces.
//!
//! These machines export `RUST_BACKTRACE=1`; with the default hook every caught panic (a
//! failing actor, a test expecting one) costs ~100 ms of backtrace capture. Binaries
//! install this one at start; `RBEE_PANIC_BACKTRACE=1` brings the default back.

/// Installs the hook unless `RBEE_PANIC_BACKTRACE=1`.
pub fn install_cheap_hook() {
    if std::env::var_os("RBEE_PANIC_BACKTRACE").is_some_and(|v| v == "1") {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("<non-string payload>");
        match info.location() {
            Some(at) => eprintln!("thread '{name}' panicked at {at}: {message}"),
            None => eprintln!("thread '{name}' panicked: {message}"),
        }
    }));
}
