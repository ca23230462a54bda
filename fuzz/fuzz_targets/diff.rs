//! The change summary and digests of engine::diff over arbitrary JSON: input is up to three
//! JSON documents separated by NUL bytes (old, new, another new). No panic; no change between a
//! value and itself; the digest is deterministic and tells different changes apart; an update
//! that changes nothing reviewable leaves a delete approval's state digest as it was.
#![no_main]

use agentguard::engine::diff::{Change, FieldChange, state_digest};
use serde_json::Value;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut docs = data.split(|b| *b == 0).map(serde_json::from_slice::<Value>);
    let (Some(Ok(old)), Some(Ok(new))) = (docs.next(), docs.next()) else { return };
    let other = match docs.next() {
        Some(Ok(v)) => v,
        _ => new.clone(),
    };

    assert!(Change::between(&old, &old).is_empty());
    let change = Change::between(&old, &new);
    assert_eq!(Change::between(&old, &new), change, "not deterministic");
    // The renderings are total.
    let _ = (change.to_string(), change.full(), change.reviewable(), change.id());

    // A Scale's missing replicas reads as 0 in the change but not in the state: skip Scales.
    let scale = old.get("kind").and_then(Value::as_str) == Some("Scale");
    if change.is_empty() && !scale {
        assert_eq!(state_digest(&old), state_digest(&new), "no change, yet another state");
    }

    // The digest encodes every change unambiguously (hidden old Secret values aside).
    let another = Change::between(&old, &other);
    let shown = |c: &Change| -> Vec<FieldChange> {
        c.fields
            .iter()
            .cloned()
            .map(|f| if f.redacted { FieldChange { old: None, ..f } } else { f })
            .collect()
    };
    if change.digest == another.digest {
        assert_eq!(shown(&change), shown(&another), "two changes share a digest");
    }
});
