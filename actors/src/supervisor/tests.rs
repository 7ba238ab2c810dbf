use super::*;

#[test]
fn intensity_allows_max_restarts_within_the_period_then_escalates() {
    let policy = RestartPolicy {
        max_restarts: 3,
        period: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    };
    let mut r = RestartIntensity::new(policy);
    let t0 = Instant::now();
    for i in 0..3 {
        match r.on_exit("w", true, Restart::Permanent, t0 + Duration::from_secs(i)) {
            Decision::Restart { after } => {
                let ceiling = Duration::from_millis(100 << i);
                assert!(after <= ceiling && after >= ceiling / 2, "{after:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        r.on_exit("w", true, Restart::Permanent, t0 + Duration::from_secs(3)),
        Decision::Escalate { restarts: 3 }
    );
    // Once old restarts leave the window, restarting is allowed again.
    assert!(matches!(
        r.on_exit("w", true, Restart::Permanent, t0 + Duration::from_secs(12)),
        Decision::Restart { .. }
    ));
}

#[test]
fn restart_kinds() {
    let mut r = RestartIntensity::new(RestartPolicy::default());
    let now = Instant::now();
    assert_eq!(
        r.on_exit("a", false, Restart::Transient, now),
        Decision::Forget
    );
    assert!(matches!(
        r.on_exit("a", true, Restart::Transient, now),
        Decision::Restart { .. }
    ));
    assert_eq!(
        r.on_exit("b", true, Restart::Temporary, now),
        Decision::Forget
    );
    assert!(matches!(
        r.on_exit("c", false, Restart::Permanent, now),
        Decision::Restart { .. }
    ));
}
