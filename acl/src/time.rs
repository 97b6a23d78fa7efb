//! Calendar arithmetic for rule expiry and audit timestamps (UTC, proleptic
//! Gregorian), without a date-time dependency.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use toml::value::{Datetime, Offset};

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn from_unix(secs: i64, nanos: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos.into())
    }
}

/// Seconds (may be negative) and nanoseconds since the epoch.
fn to_unix(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if d.subsec_nanos() == 0 {
                (-secs, 0)
            } else {
                (-secs - 1, 1_000_000_000 - d.subsec_nanos())
            }
        }
    }
}

/// A TOML offset date-time as a `SystemTime`. Local date-times, dates and
/// times have no fixed instant and give `None`.
pub(crate) fn toml_instant(dt: &Datetime) -> Option<SystemTime> {
    let (date, time, offset) = (dt.date?, dt.time?, dt.offset?);
    let days = days_from_civil(i64::from(date.year), date.month.into(), date.day.into());
    let mut secs = days * 86_400
        + i64::from(time.hour) * 3600
        + i64::from(time.minute) * 60
        + i64::from(time.second);
    if let Offset::Custom { minutes } = offset {
        secs -= i64::from(minutes) * 60;
    }
    Some(from_unix(secs, time.nanosecond))
}

/// RFC 3339 in UTC with milliseconds: `2026-05-01T12:00:00.000Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let (secs, nanos) = to_unix(t);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        nanos / 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for days in [-800_000i64, -1, 0, 1, 59, 365, 10_957, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
    }

    #[test]
    fn formats_and_converts() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::new(1_709_164_800 + 3661, 250_000_000);
        assert_eq!(rfc3339(t), "2024-02-29T01:01:01.250Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_millis(1)),
            "1969-12-31T23:59:59.999Z"
        );
        let dt: Datetime = "2024-02-29T01:01:01.25Z".parse().unwrap();
        assert_eq!(toml_instant(&dt), Some(t));
        let dt: Datetime = "2024-02-29T03:01:01.25+02:00".parse().unwrap();
        assert_eq!(toml_instant(&dt), Some(t));
        let local: Datetime = "2024-02-29T01:01:01".parse().unwrap();
        assert_eq!(toml_instant(&local), None);
        let date: Datetime = "2024-02-29".parse().unwrap();
        assert_eq!(toml_instant(&date), None);
    }
}
