//! RFC 5322 dates for Received headers and DSNs, without a date crate: UTC
//! only, which every MUA renders correctly. Kept rather than the `time`
//! crate, which would add five crates to the shipped binary for this; the
//! tests check it against `time`'s calendar over four centuries.

use std::time::{SystemTime, UNIX_EPOCH};

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).expect("day fits");
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).expect("month fits");
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month) of `t` in UTC, for date-based names (DKIM selectors).
pub fn year_month(t: SystemTime) -> (i64, u32) {
    let secs = i64::try_from(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())).unwrap_or(0);
    let (y, m, _) = civil_from_days(secs.div_euclid(86_400));
    (y, m)
}

pub fn rfc5322(t: SystemTime) -> String {
    let secs = i64::try_from(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())).unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WD[usize::try_from(days.rem_euclid(7)).expect("0..7")],
        d,
        MON[(m - 1) as usize],
        y,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn known_dates() {
        assert_eq!(rfc5322(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322(UNIX_EPOCH + Duration::from_secs(1_709_210_096)),
            "Thu, 29 Feb 2024 12:34:56 +0000"
        );
    }

    /// The same fields from `time`: weekday, day, month and year from its
    /// calendar, every 4 days 11 h 7 min 13 s (so every weekday, time of day
    /// and month comes round) from 1970 to 2370, plus the days around the
    /// leap-year rules' edges (2000 is one, 2100 and 2200 are not).
    #[test]
    fn agrees_with_the_time_crate() {
        let expect = |secs: i64| {
            let t = time::OffsetDateTime::from_unix_timestamp(secs).unwrap();
            format!(
                "{}, {} {} {} {:02}:{:02}:{:02} +0000",
                &t.weekday().to_string()[..3],
                t.day(),
                &t.month().to_string()[..3],
                t.year(),
                t.hour(),
                t.minute(),
                t.second()
            )
        };
        let at = |secs: i64| rfc5322(UNIX_EPOCH + Duration::from_secs(secs.try_into().unwrap()));
        let step = 4 * 86_400 + 11 * 3600 + 7 * 60 + 13;
        let end = 12_622_780_800; // 2370-01-01
        let mut n = 0;
        for secs in (0..end).step_by(step) {
            assert_eq!(at(secs), expect(secs), "at {secs}");
            n += 1;
        }
        assert!(n > 30_000, "{n} samples");
        for (y, m, d) in [(2000, 2, 28), (2100, 2, 28), (2200, 2, 28), (2024, 12, 31)] {
            let month = time::Month::try_from(m).unwrap();
            let day = time::Date::from_calendar_date(y, month, d).unwrap();
            let start = day.midnight().assume_utc().unix_timestamp();
            for secs in (start - 1..start + 3 * 86_400).step_by(3600) {
                assert_eq!(at(secs), expect(secs), "at {secs}");
            }
        }
    }
}
