//! A panic hook that does not capture backtraces, and panics caught on threads no actor
//! supervises (model loading, generation) so they become the owning actor's failure.
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

/// The message of a caught panic's payload.
pub fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `work`, turning a panic into its message: for blocking threads, whose panics
/// would otherwise reach nobody (a worker would wait in `Loading` forever).
pub fn caught<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|p| message(&*p))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_caught_panic_gives_its_message_and_a_value_passes_through() {
        assert_eq!(super::caught(|| 7), Ok(7));
        assert_eq!(
            super::caught(|| panic!("boom {}", 1)),
            Err::<(), _>("boom 1".into())
        );
        assert_eq!(
            super::caught(|| panic!("static")),
            Err::<(), _>("static".into())
        );
    }
}
