//! TLS for settlement's gRPC listener: the certificate it serves, and, with a client
//! CA, client certificates it requires (mutual TLS), for settlement reached over a
//! network that no mesh encrypts. The files are read again while settlement runs, so
//! renewed certificates are served without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::rustls::{
    self,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
    },
    sign::CertifiedKey,
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[derive(Debug, thiserror::Error)]
#[error("reading {path}")]
pub struct TlsFileError {
    path: String,
    source: std::io::Error,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError {
        path: path.display().to_string(),
        source,
    })
}

/// The files settlement serves TLS from: its certificate chain and key (PEM), and,
/// for mutual TLS, the CA certificates client certificates must chain to.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// Settlement's TLS: what new connections are served with, read again from its
/// files every so often ([`ServerTls::watch`]), so a certificate renewed on disk (by
/// cert-manager, a Kubernetes secret or a cron job) is served without a restart.
/// Connections already open keep the certificate they were made with. Files that no
/// longer make a working identity (a PEM that does not parse, a key that is not the
/// certificate's, an empty CA file) are refused with a warning and the last good ones
/// stay in use.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Arc<Loaded>>,
}

/// One good reading of the files.
#[derive(Debug)]
struct Loaded {
    /// The bytes read, to tell a change from the same files read again.
    bytes: FileBytes,
    key: Arc<CertifiedKey>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The served certificate's notAfter (unix seconds), when it parses.
    expires: Option<i64>,
}

impl Loaded {
    /// Publishes the certificate's expiry, and warns when clients will refuse it
    /// already: a renewal that did not happen, or a file replaced with an old one.
    fn announce(&self, cert: &Path) {
        crate::metrics::METRICS.tls_certificate_expires(self.expires);
        let now = i64::try_from(crate::verify::unix_now()).unwrap_or(i64::MAX);
        if let Some(expires) = self.expires.filter(|&e| e <= now) {
            tracing::warn!(
                cert = %cert.display(),
                expired_seconds_ago = now - expires,
                "the TLS certificate served has expired: clients will refuse it"
            );
        }
    }
}

/// When `cert` stops being valid: its notAfter, in unix seconds.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    let expires = cert.tbs_certificate.validity.not_after.to_unix_duration();
    i64::try_from(expires.as_secs()).ok()
}

type FileBytes = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    File(#[from] TlsFileError),
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsFiles {
    fn read(&self) -> Result<FileBytes, TlsFileError> {
        Ok((
            read(&self.cert)?,
            read(&self.key)?,
            self.client_ca.as_deref().map(read).transpose()?,
        ))
    }

    /// Makes the identity and the client verifier from `bytes`, as read from `self`.
    fn load(&self, bytes: FileBytes) -> Result<Loaded, TlsError> {
        let provider = provider();
        let chain = CertificateDer::pem_slice_iter(&bytes.0)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(&self.cert, e))?;
        if chain.is_empty() {
            return Err(invalid(&self.cert, "no certificate in the file"));
        }
        let expires = chain.first().and_then(not_after);
        let key = PrivateKeyDer::from_pem_slice(&bytes.1).map_err(|e| invalid(&self.key, e))?;
        let key = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|e| invalid(&self.key, format!("not the key of the certificate ({e})")))?;
        let verifier = match (&self.client_ca, &bytes.2) {
            (Some(path), Some(pem)) => {
                let mut roots = RootCertStore::empty();
                for ca in CertificateDer::pem_slice_iter(pem) {
                    let ca = ca.map_err(|e| invalid(path, e))?;
                    roots.add(ca).map_err(|e| invalid(path, e))?;
                }
                if roots.is_empty() {
                    return Err(invalid(path, "no CA certificate in the file"));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| invalid(path, e))?;
                Some(verifier)
            }
            _ => None,
        };
        Ok(Loaded {
            bytes,
            key: Arc::new(key),
            verifier,
            expires,
        })
    }
}

impl ServerTls {
    /// Reads the files; a file missing or not making a working identity is refused
    /// here, when the server starts.
    pub fn load(files: TlsFiles) -> Result<Arc<ServerTls>, TlsError> {
        let loaded = files.load(files.read()?)?;
        loaded.announce(&files.cert);
        Ok(Arc::new(ServerTls {
            files,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the files again and serves what they hold now if it differs from what
    /// is served and makes a working identity. `refused` is the last reading refused,
    /// so the same broken files are reported once, not at every look.
    fn reload(&self, refused: &mut Option<FileBytes>) {
        let bytes = match self.files.read() {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %e, "TLS files unreadable; serving the certificate read before");
                return;
            }
        };
        if bytes == self.current().bytes || refused.as_ref() == Some(&bytes) {
            return;
        }
        match self.files.load(bytes.clone()) {
            Ok(loaded) => {
                loaded.announce(&self.files.cert);
                match self.current.write() {
                    Ok(mut current) => *current = Arc::new(loaded),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(loaded),
                }
                *refused = None;
                crate::metrics::METRICS.tls_reloaded(true);
                tracing::info!(
                    cert = %self.files.cert.display(),
                    "TLS files changed: new connections get the new certificate"
                );
            }
            Err(e) => {
                *refused = Some(bytes);
                crate::metrics::METRICS.tls_reloaded(false);
                tracing::warn!(error = %e, "TLS files changed but are refused; serving the certificate read before");
            }
        }
    }

    /// Looks at the files every `every` until the returned task is aborted.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut refused = None;
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let tls = tls.clone();
                // File reads block: off the runtime's workers.
                refused = tokio::task::spawn_blocking(move || {
                    tls.reload(&mut refused);
                    refused
                })
                .await
                .unwrap_or_default();
            }
        })
    }

    /// The rustls configuration of the listener: HTTP/2 (gRPC), the certificate and
    /// client verifier of the moment for each handshake.
    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(&self.files.cert, e))?;
        let builder = if self.files.client_ca.is_some() {
            builder.with_client_cert_verifier(Arc::new(Current(self.clone())))
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_cert_resolver(Arc::new(Current(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed session skips the certificates, so a client
        // of a CA since replaced would still get in. gRPC clients keep their
        // connections, so full handshakes are rare anyway.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// Hands each handshake what [`ServerTls`] holds at that moment.
#[derive(Debug)]
struct Current(Arc<ServerTls>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

impl Current {
    fn verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.0
            .current()
            .verifier
            .clone()
            .ok_or_else(|| rustls::Error::General("no client CA configured".into()))
    }
}

impl ClientCertVerifier for Current {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The CA's names change with the files and cannot be lent from behind the
        // lock; hints are optional (a client sends the certificate it was given).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier()
            .map(|v| v.supported_verify_schemes())
            .unwrap_or_default()
    }
}

/// Whether a failed handshake is TLS refusing the client (rather than the
/// connection ending).
fn refused_by_tls(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}

/// Longest a client may take over its TLS handshake before its connection is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS connections from `accepted` (plain TCP), each handshake on its own task so a
/// slow client holds up no one else; connections whose handshake fails are closed
/// and logged. The stream ends when `accepted` does or its reader is dropped.
pub fn accept<S>(
    accepted: S,
    acceptor: tokio_rustls::TlsAcceptor,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>>
where
    S: tokio_stream::Stream<Item = std::io::Result<TcpStream>> + Send + 'static,
{
    use tokio_stream::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut accepted = std::pin::pin!(accepted);
        loop {
            let next = tokio::select! {
                next = accepted.next() => next,
                () = tx.closed() => return,
            };
            let stream = match next {
                Some(Ok(stream)) => stream,
                Some(Err(e)) => {
                    // Out of file descriptors, say: give the failing accept a pause.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                None => return,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let peer = stream.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    // What TLS refused (a certificate, a plaintext client) is worth
                    // a line; a connection closed before speaking (a TCP probe) is not.
                    Ok(Err(e)) if refused_by_tls(&e) => {
                        tracing::info!(?peer, error = %e, "TLS handshake refused")
                    }
                    Ok(Err(e)) => tracing::debug!(?peer, error = %e, "TLS handshake abandoned"),
                    Err(_) => tracing::info!(?peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The client side (operator commands): trust `ca` (else the system's roots) and
/// present `identity` (certificate and key PEM files) when given.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, TlsFileError> {
    let mut tls = match ca {
        Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?)),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    /// A self-signed certificate that expires at the start of `year` (X.509 writes
    /// dates before 2050 as UTCTime, later ones as GeneralizedTime).
    fn certificate_expiring(year: i32) -> (CertificateDer<'static>, i64) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let expires = params.not_after.unix_timestamp();
        let key = rcgen::KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap().der().clone(), expires)
    }

    #[test]
    fn a_certificate_expiry_is_read_in_either_time_encoding() {
        for year in [2031, 2049, 2050, 2101] {
            let (cert, expires) = certificate_expiring(year);
            assert_eq!(not_after(&cert), Some(expires), "{year}");
        }
        assert_eq!(not_after(&CertificateDer::from(vec![0x30, 0x00])), None);
    }
}
