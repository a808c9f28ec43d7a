//! RFC 3339 `date-time` ⇄ unix seconds, for the `exp`, `nbf` and `iat`
//! claims (the PASETO spec puts times on the wire as RFC 3339 strings).
//! Proleptic Gregorian calendar, no chrono.

/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z: the range RFC 3339's
/// four-digit years can express.
pub(super) const MIN_RFC3339: i64 = -62_167_219_200;
pub(super) const MAX_RFC3339: i64 = 253_402_300_799;

/// RFC 3339 `date-time` (section 5.6) to unix seconds. Accepts `T`/`t`,
/// `Z`/`z` or a `±HH:MM` offset, and a leap second `:60` (counted as the next
/// second, as unix time has none). Fractional seconds are truncated.
pub(super) fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |at: usize, n: usize| -> Option<i64> {
        let digits = b.get(at..at + n)?;
        digits.iter().try_fold(0i64, |acc, &d| {
            d.is_ascii_digit().then(|| acc * 10 + i64::from(d - b'0'))
        })
    };
    let sep = |at: usize, want: &[u8]| b.get(at).is_some_and(|c| want.contains(c));

    let year = num(0, 4)?;
    let month = num(5, 2)?;
    let day = num(8, 2)?;
    let hour = num(11, 2)?;
    let minute = num(14, 2)?;
    let second = num(17, 2)?;
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let mut i = 19;
    if sep(i, b".") {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match *b.get(i)? {
        b'Z' | b'z' => {
            i += 1;
            0
        }
        sign @ (b'+' | b'-') => {
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if !sep(i + 3, b":") || oh > 23 || om > 59 {
                return None;
            }
            i += 6;
            let off = oh * 3600 + om * 60;
            if sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    if i != b.len()
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Unix seconds to `YYYY-MM-DDTHH:MM:SS+00:00` (the form the PASETO spec's
/// examples use), saturating to the years 0000–9999.
pub(super) fn format_rfc3339(t: i64) -> String {
    let t = t.clamp(MIN_RFC3339, MAX_RFC3339);
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+00:00",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::testkit::NOW;
    use proptest::prelude::*;
    use rstest::rstest;

    #[rstest]
    #[case::epoch("1970-01-01T00:00:00Z", 0)]
    #[case::spec_example("2022-01-01T00:00:00+00:00", 1_640_995_200)]
    #[case::z_form("2026-11-27T10:00:00Z", NOW)]
    #[case::offset_form("2026-11-27T10:00:00+00:00", NOW)]
    #[case::lowercase("2026-11-27t10:00:00z", NOW)]
    #[case::unknown_local_offset("2026-11-27T10:00:00-00:00", NOW)]
    #[case::positive_offset("2026-11-27T15:30:00+05:30", NOW)]
    #[case::negative_offset("2026-11-27T02:00:00-08:00", NOW)]
    #[case::fraction("2026-11-27T10:00:00.999999999Z", NOW)]
    #[case::fraction_with_offset("2026-11-27T11:00:00.5+01:00", NOW)]
    #[case::before_epoch("1969-12-31T23:59:59Z", -1)]
    #[case::leap_day("2024-02-29T00:00:00Z", 1_709_164_800)]
    #[case::leap_400("2000-02-29T00:00:00Z", 951_782_400)]
    #[case::leap_second("2016-12-31T23:59:60Z", 1_483_228_800)]
    #[case::min("0000-01-01T00:00:00Z", MIN_RFC3339)]
    #[case::max("9999-12-31T23:59:59Z", MAX_RFC3339)]
    fn rfc3339_parses(#[case] s: &str, #[case] want: i64) {
        assert_eq!(parse_rfc3339(s), Some(want));
    }

    #[rstest]
    #[case::empty("")]
    #[case::date_only("2026-11-27")]
    #[case::no_offset("2026-11-27T10:00:00")]
    #[case::space_separator("2026-11-27 10:00:00Z")]
    #[case::short_year("226-11-27T10:00:00Z")]
    #[case::one_digit_month("2026-1-27T10:00:00Z")]
    #[case::month_13("2026-13-27T10:00:00Z")]
    #[case::month_0("2026-00-27T10:00:00Z")]
    #[case::day_0("2026-11-00T10:00:00Z")]
    #[case::nov_31("2026-11-31T10:00:00Z")]
    #[case::feb_29_non_leap("2023-02-29T00:00:00Z")]
    #[case::feb_29_1900("1900-02-29T00:00:00Z")]
    #[case::hour_24("2026-11-27T24:00:00Z")]
    #[case::minute_60("2026-11-27T10:60:00Z")]
    #[case::second_61("2026-11-27T10:00:61Z")]
    #[case::empty_fraction("2026-11-27T10:00:00.Z")]
    #[case::offset_no_colon("2026-11-27T10:00:00+0000")]
    #[case::offset_hour_24("2026-11-27T10:00:00+24:00")]
    #[case::offset_short("2026-11-27T10:00:00+00")]
    #[case::trailing("2026-11-27T10:00:00Zx")]
    #[case::sign_in_year("+026-11-27T10:00:00Z")]
    #[case::unix_number("1795773600")]
    #[case::non_ascii("2026-11-27T10:00:00Z\u{e9}")]
    fn rfc3339_rejects(#[case] s: &str) {
        assert_eq!(parse_rfc3339(s), None);
    }

    #[rstest]
    #[case::epoch(0, "1970-01-01T00:00:00+00:00")]
    #[case::now(NOW, "2026-11-27T10:00:00+00:00")]
    #[case::before_epoch(-1, "1969-12-31T23:59:59+00:00")]
    #[case::saturates_high(i64::MAX, "9999-12-31T23:59:59+00:00")]
    #[case::saturates_low(i64::MIN, "0000-01-01T00:00:00+00:00")]
    fn rfc3339_formats(#[case] t: i64, #[case] want: &str) {
        assert_eq!(format_rfc3339(t), want);
    }

    proptest! {

        #[test]
        fn rfc3339_never_panics(s in "[0-9T:.Zz+-]{0,40}") {
            let _ = parse_rfc3339(&s);
        }

        #[test]
        fn rfc3339_round_trips(t in MIN_RFC3339..=MAX_RFC3339) {
            prop_assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }
    }
}
