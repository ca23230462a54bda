//! The approval key's life in the cluster: one Secret in agentguard's namespace,
//! `<prefix>-approval-key`, that every replica loads at start.
//!
//! * Creation: the first replica that finds no Secret creates it with 32 random bytes
//!   (create-if-absent: a replica that loses the race gets `409 AlreadyExists` and reads the
//!   winner's), so all replicas sign and check with the same key.
//! * Data: `key` is the current key (tickets are issued under it); every other entry whose
//!   name starts with `previous` is a former key still accepted, so a rotation need not
//!   invalidate the tickets outstanding (see docs/approvals.md).
//! * Reload: every replica re-reads the Secret every 30 s ([`keep_current`]), so a rotation
//!   reaches all replicas without a restart.
//! * The key never leaves this process except in that Secret; only agentguard's ServiceAccount
//!   may read it (its Role names it), and agents must get no rights in agentguard's namespace.

use anyhow::{Context, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::engine::approval::{Key, Keys};

/// Data entry holding the current key.
pub const CURRENT: &str = "key";
/// Prefix of data entries holding former keys that are still accepted.
pub const PREVIOUS_PREFIX: &str = "previous";

/// The Secret's name for agentguard's name prefix.
pub fn secret_name(prefix: &str) -> String {
    format!("{prefix}-approval-key")
}

/// The keys a Secret holds.
pub fn keys_of(secret: &Secret) -> Result<Keys> {
    let data = secret.data.as_ref().context("the approval key Secret has no data")?;
    let key = |name: &str, bytes: &ByteString| {
        Key::from_bytes(&bytes.0)
            .with_context(|| format!("entry {name:?} of the approval key Secret is not {} bytes", Key::LEN))
    };
    let current =
        data.get(CURRENT).with_context(|| format!("the approval key Secret has no {CURRENT:?} entry"))?;
    let current = key(CURRENT, current)?;
    let previous = data
        .iter()
        .filter(|(name, _)| name.starts_with(PREVIOUS_PREFIX))
        .map(|(name, bytes)| key(name, bytes))
        .collect::<Result<Vec<_>>>()?;
    Ok(Keys::new(current, previous))
}

/// A new random key.
pub fn generate() -> Result<Key> {
    let mut bytes = [0u8; Key::LEN];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no system randomness: {e}"))?;
    Ok(Key::from_bytes(&bytes).expect("32 bytes"))
}

/// Loads the keys from the Secret `name`, creating it with a new random key if it is absent.
pub async fn load_or_create(api: &Api<Secret>, name: &str) -> Result<Keys> {
    if let Some(secret) = api.get_opt(name).await.with_context(|| format!("reading Secret {name}"))? {
        return keys_of(&secret);
    }
    let key = generate()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some([("app.kubernetes.io/managed-by".to_owned(), "agentguard".to_owned())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some([(CURRENT.to_owned(), ByteString(key.as_bytes().to_vec()))].into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(secret = name, "created the approval key");
            keys_of(&created)
        }
        // Another replica created it first: use theirs.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = api.get(name).await.with_context(|| format!("reading Secret {name}"))?;
            keys_of(&secret)
        }
        Err(e) => Err(e).with_context(|| format!("creating Secret {name}")),
    }
}

/// Re-reads the Secret every `every` and puts its keys in place of `keys` (every clone sees
/// them). A Secret that cannot be read or parsed leaves the keys as they were, loudly.
pub async fn keep_current(api: Api<Secret>, name: String, keys: Keys, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match api.get(&name).await.map_err(anyhow::Error::from).and_then(|s| keys_of(&s)) {
            Ok(loaded) if loaded != keys => {
                keys.replace(&loaded);
                tracing::info!(secret = %name, keys = ?loaded, "approval keys reloaded");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(secret = %name, error = format!("{e:#}"), "cannot reload the approval keys; keeping the loaded ones")
            }
        }
    }
}

/// Keys for a process that has no namespace to keep a Secret in: random, this process only.
/// Tickets it issues are refused by any other replica and after a restart.
pub fn ephemeral() -> Result<Keys> {
    let key = generate()?;
    if key.as_bytes().iter().all(|b| *b == 0) {
        bail!("the system's randomness returned zeros");
    }
    Ok(Keys::new(key, Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(entries: &[(&str, Vec<u8>)]) -> Secret {
        Secret {
            data: Some(entries.iter().map(|(k, v)| ((*k).to_owned(), ByteString(v.clone()))).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn the_secret_holds_the_current_and_previous_keys() {
        let keys =
            keys_of(&secret(&[("key", vec![1; 32]), ("previous", vec![2; 32]), ("note", vec![0])])).unwrap();
        assert_eq!(
            keys,
            Keys::new(Key::from_bytes(&[1; 32]).unwrap(), vec![Key::from_bytes(&[2; 32]).unwrap()])
        );
        assert!(keys_of(&secret(&[("previous", vec![2; 32])])).is_err());
        let short = keys_of(&secret(&[("key", vec![1; 16])])).unwrap_err();
        assert!(format!("{short:#}").contains("not 32 bytes"), "{short:#}");
    }

    #[test]
    fn a_replaced_key_reaches_every_clone() {
        let keys = Keys::new(Key::from_bytes(&[1; 32]).unwrap(), Vec::new());
        let held_elsewhere = keys.clone();
        let rotated = Keys::new(Key::from_bytes(&[2; 32]).unwrap(), vec![Key::from_bytes(&[1; 32]).unwrap()]);
        keys.replace(&rotated);
        assert_eq!(held_elsewhere, rotated);
        assert_ne!(Keys::none(), rotated);
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(generate().unwrap(), generate().unwrap());
    }
}
