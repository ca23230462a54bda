//! The approval annotation's parser and verifier (engine::approval): any value parses or is
//! refused without a panic; a parsed ticket re-encodes to itself; a value is accepted only when
//! agentguard would have issued exactly it; an issued ticket is accepted exactly within its
//! lifetime, and for nothing else once any character of it is changed.
//!
//! Input: the annotation value, a NUL byte, then the bytes `arbitrary` makes the rest from (so
//! that real values seed the corpus as they are).
#![no_main]

use agentguard::engine::approval::{self, CLOCK_SKEW, Keys, Op, Refusal, Subject, Ticket};
use arbitrary::Arbitrary;
use jiff::SignedDuration;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    uid: &'a str,
    delete: bool,
    digest: [u8; 32],
    /// Seconds from now the ticket is issued at.
    issued: i32,
    ttl: u32,
    max_ttl: u32,
    /// Which character of an issued value to change, and to what.
    at: u16,
    to: char,
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (value, rest) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let value = String::from_utf8_lossy(value);
    let Ok(input) = Input::arbitrary_take_rest(arbitrary::Unstructured::new(rest)) else { return };
    run(&value, &input);
});

fn run(value: &str, input: &Input<'_>) {
    let keys = Keys::fixed_for_tests();
    let now = agentguard_fuzz::now();
    let op = if input.delete { Op::Delete } else { Op::Update };
    let subject = Subject { uid: input.uid, op, digest: &input.digest };
    let max_ttl = SignedDuration::from_secs(i64::from(input.max_ttl));

    // Any value: parsed or refused, and accepted only if it is what agentguard issues.
    if let Ok(ticket) = Ticket::parse(value) {
        assert_eq!(Ticket::parse(&ticket.value()), Ok(ticket.clone()));
    }
    if approval::check(Some(value), &keys, &subject, max_ttl, now).is_ok() {
        let ticket = Ticket::parse(value).expect("accepted, so parsed");
        let ttl = SignedDuration::from_secs(i64::from(ticket.ttl));
        let reissued = Ticket::issue(&keys, &subject, ticket.issued_at(), ttl).expect("a key");
        assert_eq!(reissued.value(), value.trim(), "accepted a ticket agentguard did not issue");
    }
    let _ = approval::check_new(value, &keys, input.uid, &input.digest, max_ttl, now);

    // A ticket agentguard issues: accepted exactly while live, and only as issued.
    let issued_at = now.checked_add(SignedDuration::from_secs(i64::from(input.issued))).expect("in range");
    let ttl = SignedDuration::from_secs(i64::from(input.ttl));
    let ticket = Ticket::issue(&keys, &subject, issued_at, ttl).expect("a key");
    let issued_value = ticket.value();
    // Past the largest timestamp, a ticket never expires (before its max_ttl cap).
    let expires = issued_at
        .checked_add(SignedDuration::from_secs(i64::from(input.ttl.max(1))).min(max_ttl))
        .unwrap_or(jiff::Timestamp::MAX);
    let expected = if issued_at > now.checked_add(CLOCK_SKEW).unwrap() {
        Err(Refusal::IssuedInFuture(issued_at))
    } else if now >= expires {
        Err(Refusal::Expired(expires))
    } else {
        Ok(expires)
    };
    assert_eq!(
        approval::check(Some(&issued_value), &keys, &subject, max_ttl, now),
        expected,
        "{issued_value}"
    );
    assert_eq!(
        approval::check_new(&issued_value, &keys, input.uid, &input.digest, max_ttl, now).map(|t| t.value()),
        expected.clone().map(|_| issued_value.clone())
    );
    let other = Subject { uid: &format!("{}x", input.uid), ..subject };
    assert_eq!(approval::check(Some(&issued_value), &keys, &other, max_ttl, now), Err(Refusal::Foreign));
    let wanted = if input.delete { Op::Update } else { Op::Delete };
    let wrong_op = Subject { op: wanted, ..subject };
    assert_eq!(
        approval::check(Some(&issued_value), &keys, &wrong_op, max_ttl, now),
        Err(Refusal::WrongOperation { approved: op, wanted })
    );

    let mut chars: Vec<char> = issued_value.chars().collect();
    let at = usize::from(input.at) % chars.len();
    if chars[at] != input.to {
        chars[at] = input.to;
        let tampered: String = chars.into_iter().collect();
        if tampered.trim() != issued_value {
            let result = approval::check(Some(&tampered), &keys, &subject, max_ttl, now);
            assert!(result.is_err(), "{tampered} was accepted for {issued_value}");
        }
    }
}
