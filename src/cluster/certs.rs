//! Self-managed certificates: agentguard's own CA and serving certificate (rcgen, ECDSA P-256),
//! kept in one Secret that every replica shares and written to the local files the TLS server
//! hot-reloads (and the webhook registration reads the CA bundle from).
//!
//! Writes to the Secret use optimistic concurrency (create, or replace at the resourceVersion
//! read): when two replicas renew at once, one wins and the other adopts its certificate, so
//! exactly one certificate is ever current. The serving certificate is renewed once a third of
//! its validity is left. The CA (ten years) is rotated the same way, in two steps so that no
//! API server ever sees a certificate it cannot verify: first a new CA joins the trust bundle
//! (`ca.crt`, also the webhooks' caBundle) beside the old one; once the bundle has had time to
//! reach everyone, the serving certificate moves to the new CA; the old CA leaves the bundle
//! when it expires.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

const CA_NAME: &str = "agentguard-ca";
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Where and for which names certificates are made.
#[derive(Clone, Debug)]
pub struct SelfSigned {
    pub namespace: String,
    pub secret: String,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Lifetime of a serving certificate.
    pub validity: Duration,
    /// Lifetime of a CA.
    pub ca_validity: Duration,
    /// How long a new CA is trusted before it signs the serving certificate: time for every
    /// replica to put it in the webhooks' caBundle.
    pub propagation: Duration,
    /// Local files the TLS server and the registration read.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

/// Contents of the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bundle {
    /// Trust bundle: the signing CA first, then older CAs still trusted.
    pub ca_cert: String,
    /// Key of the signing CA.
    pub ca_key: String,
    pub cert: String,
    pub key: String,
    /// Fingerprint of the CA that signed `cert`.
    pub cert_issuer: String,
    /// When the signing CA became the signing CA.
    pub ca_since: Timestamp,
}

/// The PEM certificates of a bundle, in order.
fn pem_certificates(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .map(str::trim)
        .filter(|c| c.starts_with("-----BEGIN CERTIFICATE-----") && c.ends_with(END))
        .map(|c| format!("{c}\n"))
        .collect()
}

/// Short fingerprint naming a CA certificate.
fn fingerprint(pem: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(pem.trim().as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn validity_window(params: &mut CertificateParams, now: Timestamp, validity: Duration) -> Result<()> {
    let start = now.as_second() - 300; // tolerate clock skew between nodes
    let end = now.as_second().saturating_add(i64::try_from(validity.as_secs())?);
    params.not_before = time::OffsetDateTime::from_unix_timestamp(start)?;
    params.not_after = time::OffsetDateTime::from_unix_timestamp(end)?;
    Ok(())
}

fn ca_params(now: Timestamp) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity_window(&mut params, now, CA_VALIDITY)?;
    Ok(params)
}

/// A new CA valid for `validity`: (certificate PEM, key PEM).
pub fn issue_ca(now: Timestamp, validity: Duration) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = ca_params(now)?;
    validity_window(&mut params, now, validity)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate signed by the CA whose key is `ca_key`: (certificate PEM, key PEM).
pub fn issue_serving(ca_key: &str, cfg: &SelfSigned, now: Timestamp) -> Result<(String, String)> {
    let ca_key = KeyPair::from_pem(ca_key).context("the CA key in the Secret is not a valid PEM key")?;
    // The issuer is identified by its name and key, both stable, so the CA parameters can be
    // rebuilt instead of parsed back from its certificate.
    let issuer = Issuer::new(ca_params(now)?, ca_key);
    let mut params = CertificateParams::new(cfg.dns_names.clone())?;
    params.subject_alt_names.extend(cfg.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params
        .distinguished_name
        .push(DnType::CommonName, cfg.dns_names.first().map(String::as_str).unwrap_or("agentguard"));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity_window(&mut params, now, cfg.validity)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Not-after of the first certificate in `pem`, as unix seconds.
pub fn not_after(pem: &str) -> Option<i64> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    leaf_not_after(&der)
}

/// What the Secret should hold now: `None` when `current` is fine as it is.
pub fn plan(current: Option<&Bundle>, cfg: &SelfSigned, now: Timestamp) -> Result<Option<Bundle>> {
    let a_third_left = |cert: &str, lifetime: Duration| {
        not_after(cert).is_none_or(|end| {
            end - now.as_second() < i64::try_from(lifetime.as_secs() / 3).unwrap_or(i64::MAX)
        })
    };
    let usable = current.filter(|b| {
        KeyPair::from_pem(&b.ca_key).is_ok()
            && pem_certificates(&b.ca_cert).first().is_some_and(|c| not_after(c).is_some())
    });
    let Some(current) = usable else {
        // Nothing usable: start over with a new CA.
        let (ca_cert, ca_key) = issue_ca(now, cfg.ca_validity)?;
        let (cert, key) = issue_serving(&ca_key, cfg, now)?;
        return Ok(Some(Bundle {
            cert_issuer: fingerprint(&ca_cert),
            ca_cert,
            ca_key,
            cert,
            key,
            ca_since: now,
        }));
    };
    let mut next = current.clone();
    // The trust bundle keeps the signing CA and every older CA that has not expired.
    let mut trusted = pem_certificates(&next.ca_cert);
    let signing = trusted.remove(0);
    trusted.retain(|c| not_after(c).is_some_and(|end| end > now.as_second()));
    // Step 1: a CA with a third of its life left is succeeded by a new one, trusted beside it.
    let signing = if a_third_left(&signing, cfg.ca_validity) {
        let (ca_cert, ca_key) = issue_ca(now, cfg.ca_validity)?;
        trusted.insert(0, signing);
        next.ca_key = ca_key;
        next.ca_since = now;
        ca_cert
    } else {
        signing
    };
    next.ca_cert = std::iter::once(signing.clone()).chain(trusted).collect();
    // Step 2: the serving certificate moves to the signing CA once every replica has had time to
    // put it in the caBundle; until then it is not renewed (the delay is short beside a third of
    // its life), since only the new CA's key is kept.
    let renew = if next.cert_issuer == fingerprint(&signing) {
        a_third_left(&next.cert, cfg.validity)
    } else {
        now.duration_since(next.ca_since) >= jiff::SignedDuration::try_from(cfg.propagation)?
    };
    if renew {
        let (cert, key) = issue_serving(&next.ca_key, cfg, now)?;
        next.cert = cert;
        next.key = key;
        next.cert_issuer = fingerprint(&signing);
    }
    Ok((next != *current).then_some(next))
}

fn bundle_of(secret: &Secret) -> Option<Bundle> {
    let data = secret.data.as_ref()?;
    let get = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok());
    let ca_cert = get("ca.crt")?;
    Some(Bundle {
        // Secrets written before these keys existed: the signing CA signed the certificate.
        cert_issuer: get("tls.issuer").unwrap_or_else(|| {
            pem_certificates(&ca_cert).first().map(|c| fingerprint(c)).unwrap_or_default()
        }),
        ca_since: get("ca.since").and_then(|t| t.parse().ok()).unwrap_or(Timestamp::UNIX_EPOCH),
        ca_cert,
        ca_key: get("ca.key")?,
        cert: get("tls.crt")?,
        key: get("tls.key")?,
    })
}

fn secret_of(cfg: &SelfSigned, bundle: &Bundle, resource_version: Option<String>) -> Secret {
    let since = bundle.ca_since.to_string();
    let data = [
        ("ca.crt", &bundle.ca_cert),
        ("ca.key", &bundle.ca_key),
        ("tls.crt", &bundle.cert),
        ("tls.key", &bundle.key),
        ("tls.issuer", &bundle.cert_issuer),
        ("ca.since", &since),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(cfg.secret.clone()),
            namespace: Some(cfg.namespace.clone()),
            resource_version,
            labels: Some([("app.kubernetes.io/managed-by".to_string(), "agentguard".to_string())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Makes sure the Secret holds a current bundle and returns it.
pub async fn ensure(api: &Api<Secret>, cfg: &SelfSigned) -> Result<Bundle> {
    for _ in 0..5 {
        let existing = api.get_opt(&cfg.secret).await.context("reading the certificate Secret")?;
        let current = existing.as_ref().and_then(bundle_of);
        let Some(next) = plan(current.as_ref(), cfg, Timestamp::now())? else {
            return current.context("a current bundle");
        };
        let written = match &existing {
            None => api.create(&PostParams::default(), &secret_of(cfg, &next, None)).await,
            Some(s) => {
                api.replace(
                    &cfg.secret,
                    &PostParams::default(),
                    &secret_of(cfg, &next, s.metadata.resource_version.clone()),
                )
                .await
            }
        };
        match written {
            Ok(_) => {
                tracing::info!(secret = %cfg.secret, not_after = ?not_after(&next.cert), "serving certificate issued");
                return Ok(next);
            }
            // Another replica wrote first: adopt what it wrote.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e).context("writing the certificate Secret"),
        }
    }
    anyhow::bail!("the certificate Secret kept changing under us")
}

/// Writes `contents` to `path` through a temporary file and a rename, so readers never see a
/// half-written file; does nothing when the file already holds it.
fn write_atomically(path: &Path, contents: &str) -> Result<bool> {
    if std::fs::read_to_string(path).is_ok_and(|c| c == contents) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(true)
}

/// Puts the bundle where the TLS server and the registration read it. The CA goes first, so the
/// webhook's caBundle never lags behind a certificate it must verify.
pub fn write_files(cfg: &SelfSigned, bundle: &Bundle) -> Result<bool> {
    let ca = write_atomically(&cfg.ca_file, &bundle.ca_cert)?;
    let key = write_atomically(&cfg.key_file, &bundle.key)?;
    let cert = write_atomically(&cfg.cert_file, &bundle.cert)?;
    Ok(ca || key || cert)
}

/// Keeps the Secret and the files current, checking every `every`. Runs until dropped.
pub async fn keep_current(api: Api<Secret>, cfg: SelfSigned, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match ensure(&api, &cfg).await.and_then(|b| write_files(&cfg, &b)) {
            Ok(true) => tracing::info!("certificate files updated"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "certificate check failed; keeping the current one")
            }
        }
    }
}

// Reading a certificate's validity from its DER, for the serving certificate's expiry and this
// module's renewals alike.

pub(crate) const DER_SEQUENCE: u8 = 0x30;
pub(crate) const DER_INTEGER: u8 = 0x02;
pub(crate) const DER_UTC_TIME: u8 = 0x17;
pub(crate) const DER_GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT` wrapper of the optional `version` field of a certificate.
pub(crate) const DER_CONTEXT_0: u8 = 0xa0;

/// Splits the first DER element off `input`: `(tag, contents, rest)`.
/// Handles only the single-byte tags and definite lengths that occur in the
/// certificate fields walked here.
pub(crate) fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, rest) = rest.split_at(count);
        let len = bytes.iter().fold(0usize, |len, &b| (len << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

/// Like [`der_next`] but requires the element to carry `tag`.
pub(crate) fn der_expect(tag: u8, input: &[u8]) -> Option<(&[u8], &[u8])> {
    match der_next(input)? {
        (found, contents, rest) if found == tag => Some((contents, rest)),
        _ => None,
    }
}

/// `tbsCertificate.validity.notAfter` of a DER certificate, as unix seconds.
pub(crate) fn leaf_not_after(cert: &[u8]) -> Option<i64> {
    let (certificate, _) = der_expect(DER_SEQUENCE, cert)?;
    let (tbs, _) = der_expect(DER_SEQUENCE, certificate)?;
    let tbs = match der_next(tbs)? {
        (DER_CONTEXT_0, _, rest) => rest,
        _ => tbs,
    };
    let (_serial, rest) = der_expect(DER_INTEGER, tbs)?;
    let (_signature_algorithm, rest) = der_expect(DER_SEQUENCE, rest)?;
    let (_issuer, rest) = der_expect(DER_SEQUENCE, rest)?;
    let (validity, _) = der_expect(DER_SEQUENCE, rest)?;
    let (_not_before_tag, _, rest) = der_next(validity)?;
    let (tag, not_after, _) = der_next(rest)?;
    asn1_time_to_unix(tag, not_after)
}

/// RFC 5280 Time: UTCTime `YYMMDDHHMMSSZ` (YY >= 50 is 19YY) or
/// GeneralizedTime `YYYYMMDDHHMMSSZ`.
pub(crate) fn asn1_time_to_unix(tag: u8, value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?;
    if !text.bytes().all(|b| b.is_ascii_digit() || b == b'Z') {
        return None;
    }
    let full = match tag {
        DER_UTC_TIME => {
            let yy: u8 = text.get(..2)?.parse().ok()?;
            format!("{}{text}", if yy >= 50 { "19" } else { "20" })
        }
        DER_GENERALIZED_TIME => text.to_owned(),
        _ => return None,
    };
    if full.len() != "YYYYMMDDHHMMSSZ".len() {
        return None;
    }
    let datetime = jiff::fmt::strtime::parse("%Y%m%d%H%M%SZ", &full).ok()?.to_datetime().ok()?;
    let timestamp = jiff::tz::TimeZone::UTC.to_timestamp(datetime).ok()?;
    Some(timestamp.as_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(validity: Duration) -> SelfSigned {
        SelfSigned {
            namespace: "agentguard-system".into(),
            secret: "agentguard-tls".into(),
            dns_names: vec!["agentguard.agentguard-system.svc".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            validity,
            ca_validity: CA_VALIDITY,
            propagation: Duration::from_secs(600),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            ca_file: PathBuf::new(),
        }
    }

    #[test]
    fn a_first_plan_makes_a_ca_and_a_serving_certificate_it_signed() {
        use rustls::client::danger::ServerCertVerifier;
        let now = Timestamp::now();
        let day = Duration::from_secs(86400);
        let bundle = plan(None, &cfg(90 * day), now).unwrap().unwrap();
        let end = not_after(&bundle.cert).unwrap();
        assert!((end - now.as_second() - 90 * 86400).abs() < 5, "{end}");
        assert!(not_after(&bundle.ca_cert).unwrap() > end);
        // The serving certificate verifies against the CA, for the names asked for.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(bundle.ca_cert.as_bytes()).unwrap()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            rustls::crypto::ring::default_provider().into(),
        )
        .build()
        .unwrap();
        let leaf = CertificateDer::from_pem_slice(bundle.cert.as_bytes()).unwrap();
        for name in ["agentguard.agentguard-system.svc", "127.0.0.1"] {
            let server = rustls::pki_types::ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&leaf, &[], &server, &[], rustls::pki_types::UnixTime::now())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn renewal_keeps_the_ca_and_happens_at_a_third_of_the_lifetime() {
        let day = Duration::from_secs(86400);
        let t0 = Timestamp::now();
        let first = plan(None, &cfg(90 * day), t0).unwrap().unwrap();
        let at = |days: i64| t0 + jiff::SignedDuration::from_hours(24 * days);
        assert_eq!(plan(Some(&first), &cfg(90 * day), at(59)).unwrap(), None, "two thirds left: keep");
        let renewed = plan(Some(&first), &cfg(90 * day), at(61)).unwrap().unwrap();
        assert_eq!(
            (renewed.ca_cert.as_str(), renewed.ca_key.as_str()),
            (first.ca_cert.as_str(), first.ca_key.as_str())
        );
        assert_ne!(renewed.cert, first.cert);
        // A broken bundle is replaced whole.
        let broken = Bundle { ca_key: "garbage".into(), ..first };
        let replaced = plan(Some(&broken), &cfg(90 * day), t0).unwrap().unwrap();
        assert_ne!(replaced.ca_cert, broken.ca_cert);
    }

    #[test]
    fn the_ca_rotates_in_two_steps_with_old_and_new_side_by_side() {
        let day = Duration::from_secs(86400);
        let mut c = cfg(30 * day);
        c.ca_validity = 300 * day;
        let at = |t0: Timestamp, days: i64, minutes: i64| {
            t0 + jiff::SignedDuration::from_hours(24 * days) + jiff::SignedDuration::from_mins(minutes)
        };
        let t0 = Timestamp::now();
        let first = plan(None, &c, t0).unwrap().unwrap();
        assert_eq!(pem_certificates(&first.ca_cert).len(), 1);
        // Two thirds of the CA's life gone: a new CA signs from now on, the old one stays trusted,
        // and the serving certificate (still the old CA's) is left alone.
        let mut b = first.clone();
        for day in [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190] {
            if let Some(next) = plan(Some(&b), &c, at(t0, day, 0)).unwrap() {
                b = next;
            }
        }
        assert_eq!(b.ca_key, first.ca_key, "the CA is not rotated with two thirds of its life left");
        let step1 = plan(Some(&b), &c, at(t0, 201, 0)).unwrap().unwrap();
        let trusted = pem_certificates(&step1.ca_cert);
        assert_eq!(trusted.len(), 2, "old and new CA side by side");
        assert_eq!(trusted[1], pem_certificates(&first.ca_cert)[0]);
        assert_eq!(step1.cert, b.cert, "the serving certificate waits for the new CA to propagate");
        assert_eq!(plan(Some(&step1), &c, at(t0, 201, 5)).unwrap(), None);
        // Once propagated, the serving certificate moves to the new CA.
        let step2 = plan(Some(&step1), &c, at(t0, 201, 11)).unwrap().unwrap();
        assert_ne!(step2.cert, step1.cert);
        assert_eq!(step2.cert_issuer, fingerprint(&trusted[0]));
        assert_eq!(step2.ca_cert, step1.ca_cert);
        // The old CA leaves the bundle when it expires.
        let later = plan(Some(&step2), &c, at(t0, 301, 0)).unwrap().unwrap();
        assert_eq!(pem_certificates(&later.ca_cert), vec![trusted[0].clone()]);
    }

    #[test]
    fn files_are_written_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(Duration::from_secs(3600));
        c.cert_file = dir.path().join("tls.crt");
        c.key_file = dir.path().join("tls.key");
        c.ca_file = dir.path().join("ca.crt");
        let bundle = plan(None, &c, Timestamp::now()).unwrap().unwrap();
        assert!(write_files(&c, &bundle).unwrap());
        assert!(!write_files(&c, &bundle).unwrap());
        assert_eq!(std::fs::read_to_string(&c.cert_file).unwrap(), bundle.cert);
    }
}
