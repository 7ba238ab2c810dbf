use std::time::Duration;

use super::*;

#[test]
fn the_idle_stop_column_counts_down_from_the_last_request() {
    let five_min = IdleTimeout::After(Duration::from_secs(300));
    assert_eq!(idle_stop(five_min, Some(2)), "in 4m58s");
    assert_eq!(idle_stop(five_min, Some(295)), "in 5s");
    assert_eq!(
        idle_stop(five_min, Some(400)),
        "in 0s",
        "overdue: the hive is on it"
    );
    assert_eq!(idle_stop(five_min, None), "busy");
    let day = IdleTimeout::After(Duration::from_secs(86_400));
    assert_eq!(idle_stop(day, Some(60)), "in 23h59m");
    assert_eq!(idle_stop(IdleTimeout::Never, Some(9)), "never");
    assert_eq!(
        idle_stop(IdleTimeout::AfterEachRequest, None),
        "per request"
    );
}
