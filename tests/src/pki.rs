//! A private certificate authority for TLS tests: a CA, a certificate settlement serves
//! (for `localhost` and 127.0.0.1) and a client certificate (what Envoy or an operator
//! presents), written as PEM files into a scratch directory that goes with it.

use std::path::PathBuf;

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
    _dir: ScratchDir,
}

impl TestPki {
    pub fn generate() -> Result<TestPki> {
        let dir = ScratchDir::new("pki")?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "402x test CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem())?;
        let issue = |name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca, &ca_key)?;
            let files = CertFiles {
                cert: dir.path().join(format!("{name}.pem")),
                key: dir.path().join(format!("{name}.key")),
            };
            std::fs::write(&files.cert, cert.pem())?;
            std::fs::write(&files.key, key.serialize_pem())?;
            anyhow::Ok(files)
        };
        let server = issue(
            "settlement",
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let client = issue(
            "client",
            vec!["client.x402.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(TestPki {
            ca: ca_path,
            server,
            client,
            _dir: dir,
        })
    }
}
