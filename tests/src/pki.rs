//! A private certificate authority for TLS tests: a CA, a certificate settlement serves
//! (for `localhost` and 127.0.0.1) and a client certificate (what Envoy or an operator
//! presents), written as PEM files into a scratch directory that goes with it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use crate::process::ScratchDir;

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct TestPki {
    /// The CA certificate (PEM): what both sides trust.
    pub ca: PathBuf,
    pub server: CertFiles,
    pub client: CertFiles,
    /// Issues so far: each issue's certificates expire a year after the last's.
    issued: AtomicI32,
    _dir: ScratchDir,
}

/// The year on whose first day the certificates of the `n`-th issue expire: far off,
/// and different per issue, so which one is served can be told apart.
fn expiry_year(n: i32) -> i32 {
    2100 + n
}

impl TestPki {
    pub fn generate() -> Result<TestPki> {
        let dir = ScratchDir::new("pki")?;
        let path = |name: &str| dir.path().join(name);
        let pki = TestPki {
            ca: path("ca.pem"),
            server: CertFiles {
                cert: path("settlement.pem"),
                key: path("settlement.key"),
            },
            client: CertFiles {
                cert: path("client.pem"),
                key: path("client.key"),
            },
            issued: AtomicI32::new(0),
            _dir: dir,
        };
        pki.issue()?;
        Ok(pki)
    }

    /// Replaces every file with a new CA and certificates it signed, as an operator
    /// rotating a CA would (each file replaced by a rename, never seen half written).
    pub fn rotate(&self) -> Result<()> {
        self.issue()
    }

    /// When the certificates written last expire (notAfter, unix seconds).
    pub fn expires_unix(&self) -> i64 {
        rcgen::date_time_ymd(expiry_year(self.issued.load(Ordering::Relaxed)), 1, 1)
            .unix_timestamp()
    }

    fn issue(&self) -> Result<()> {
        let n = self.issued.load(Ordering::Relaxed) + 1;
        let not_after = rcgen::date_time_ymd(expiry_year(n), 1, 1);
        let write = |path: &PathBuf, pem: String| {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, pem)?;
            std::fs::rename(&partial, path)
        };
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "402x test CA");
        let ca = ca_params.self_signed(&ca_key)?;
        write(&self.ca, ca.pem())?;
        let issue = |files: &CertFiles, name: &str, sans: Vec<String>, usage| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            params.not_after = not_after;
            let cert = params.signed_by(&key, &ca, &ca_key)?;
            write(&files.cert, cert.pem())?;
            write(&files.key, key.serialize_pem())?;
            anyhow::Ok(())
        };
        issue(
            &self.server,
            "settlement",
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        issue(
            &self.client,
            "client",
            vec!["client.x402.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        self.issued.store(n, Ordering::Relaxed);
        Ok(())
    }
}
