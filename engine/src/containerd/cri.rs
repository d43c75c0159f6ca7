//! The CRI image service proxy: kubelet's `--image-service-endpoint`
//! points here, and every ImageService call (PullImage, ImageStatus,
//! ListImages, RemoveImage, ImageFsInfo; `runtime.v1` and the older
//! `runtime.v1alpha2`) goes on to containerd unchanged, byte for byte,
//! its answer coming back the same way.
//!
//! Why: containerd never passes a pull's credentials to a snapshotter, so
//! without this a private image (a pod's `imagePullSecrets`, which kubelet
//! sends as `PullImageRequest.auth`) cannot take the fast path and falls
//! back to containerd's own pull. Here a PullImage's `auth` is lent to the
//! fast path's [`Keyring`] for that image's registry and repository while
//! the call runs (the Prepares of its layers come during it), and taken
//! back when it ends. The secret stays in memory: it is never logged,
//! never written, and sent only where the fast path sends a secret lent
//! for that registry (see [`crate::source::remote::auth`]).
//!
//! The proxy reads nothing else of the calls; a call it cannot read is
//! forwarded all the same (the fast path then goes without credentials,
//! and falls back if it needs them).

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status};

use crate::containerd::metrics::Metrics;
use crate::oci::reference::Reference;
use crate::source::remote::auth::{auth_key_host, decode_auth, Credentials, Keyring, Lent, Secret};

/// The largest request forwarded (kubelet's largest, a PullImage with its
/// pod's sandbox config, is far smaller).
const MAX_REQUEST: usize = 4 << 20;
/// The largest answer forwarded (ListImages on a node with many images;
/// containerd's own limit is 16 MiB).
const MAX_RESPONSE: usize = 16 << 20;

/// Messages as bytes: what the proxy forwards is what it got.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// The parts of CRI's `PullImageRequest` the proxy reads (the rest is
/// skipped when decoding, and forwarded as it came).
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    auth: Option<AuthConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
struct ImageSpec {
    #[prost(string, tag = "1")]
    image: String,
}

/// CRI's `AuthConfig`: what kubelet made of the pod's pull secret.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
struct AuthConfig {
    #[prost(string, tag = "1")]
    username: String,
    #[prost(string, tag = "2")]
    password: String,
    /// base64 of `user:password`.
    #[prost(string, tag = "3")]
    auth: String,
    #[prost(string, tag = "4")]
    server_address: String,
    #[prost(string, tag = "5")]
    identity_token: String,
    #[prost(string, tag = "6")]
    registry_token: String,
}

impl AuthConfig {
    /// The secret this says, in containerd's order of preference: user
    /// and password, an identity token, `auth`; then a registry token.
    fn secret(&self) -> Option<Secret> {
        if !self.username.is_empty() {
            return Some(Secret::Password(Credentials {
                user: self.username.clone(),
                password: self.password.clone(),
            }));
        }
        if !self.identity_token.is_empty() {
            return Some(Secret::IdentityToken(self.identity_token.clone()));
        }
        if !self.auth.is_empty() {
            return decode_auth(&self.auth).ok().map(Secret::Password);
        }
        if !self.registry_token.is_empty() {
            return Some(Secret::RegistryToken(self.registry_token.clone()));
        }
        None
    }

    /// The host `server_address` names, if it names one.
    fn server(&self) -> Option<String> {
        Some(auth_key_host(self.server_address.trim()))
            .filter(|h| !h.is_empty())
            .map(str::to_string)
    }
}

/// Lends a PullImage's credentials to `keys` for its image's repository:
/// `None` when the request carries none (or cannot be read).
fn lend(keys: &Arc<Keyring>, body: &[u8]) -> Option<Lent> {
    let req = <PullImageRequest as prost::Message>::decode(body).ok()?;
    let auth = req.auth?;
    let secret = auth.secret()?;
    let image = Reference::parse(&req.image?.image).ok()?;
    keys.lend(
        &image.registry,
        &image.repository,
        auth.server().as_deref(),
        secret,
    )
}

/// Where the proxy forwards: containerd's socket, one HTTP/2 connection
/// made when first needed and made again when lost.
#[derive(Clone)]
struct Upstream {
    channel: tonic::transport::Channel,
    keys: Arc<Keyring>,
    metrics: Arc<Metrics>,
}

impl Upstream {
    fn new(socket: PathBuf, keys: Arc<Keyring>, metrics: Arc<Metrics>) -> Upstream {
        let channel = crate::containerd::client::channel(socket);
        Upstream {
            channel,
            keys,
            metrics,
        }
    }

    /// Forwards one call, `method` its path; a PullImage's credentials are
    /// lent while it runs.
    async fn forward(&self, path: String, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let r = self.forward_inner(&path, req).await;
        let code = r.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        self.metrics.cri_call(&path, code);
        r
    }

    async fn forward_inner(
        &self,
        path: &str,
        req: Request<Bytes>,
    ) -> Result<Response<Bytes>, Status> {
        let lent = path
            .ends_with("/PullImage")
            .then(|| lend(&self.keys, req.get_ref()))
            .flatten();
        let path: http::uri::PathAndQuery = path
            .parse()
            .map_err(|_| Status::unimplemented("not a method path"))?;
        let mut grpc = tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(MAX_RESPONSE)
            .max_encoding_message_size(MAX_REQUEST);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("containerd's socket: {e}")))?;
        let (meta, ext, body) = req.into_parts();
        let mut out = Request::from_parts(meta, ext, body);
        // The caller's deadline goes on with the call.
        if let Some(t) = out
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout)
        {
            out.set_timeout(t);
        }
        let answer = grpc.unary(out, path, Raw).await;
        drop(lent);
        answer
    }
}

/// A `grpc-timeout` header's value (`<digits><unit>`).
fn grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The CRI API version a [`Forward`] serves.
pub(crate) trait Api: Send + Sync + 'static {
    /// Its service name.
    const NAME: &'static str;
}

/// `runtime.v1.ImageService` (kubelet 1.26 and later).
pub(crate) struct V1;
impl Api for V1 {
    const NAME: &'static str = "runtime.v1.ImageService";
}

/// `runtime.v1alpha2.ImageService` (older kubelets; containerd 1.6 and
/// 1.7 serve it).
pub(crate) struct V1Alpha2;
impl Api for V1Alpha2 {
    const NAME: &'static str = "runtime.v1alpha2.ImageService";
}

/// Every method of one version of the image service, forwarded.
pub(crate) struct Forward<A> {
    up: Upstream,
    api: PhantomData<A>,
}

impl<A> Clone for Forward<A> {
    fn clone(&self) -> Self {
        Forward {
            up: self.up.clone(),
            api: PhantomData,
        }
    }
}

impl<A: Api> tonic::server::NamedService for Forward<A> {
    const NAME: &'static str = A::NAME;
}

/// One call, as tonic's unary handler runs it.
struct Call {
    up: Upstream,
    path: String,
}

impl tonic::server::UnaryService<Bytes> for Call {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Bytes>, Status>> + Send>>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let (up, path) = (self.up.clone(), std::mem::take(&mut self.path));
        Box::pin(async move { up.forward(path, req).await })
    }
}

impl<A: Api> tower::Service<http::Request<tonic::body::Body>> for Forward<A> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let call = Call {
            up: self.up.clone(),
            path: req.uri().path().to_string(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Raw)
                .max_decoding_message_size(MAX_REQUEST)
                .max_encoding_message_size(MAX_RESPONSE);
            Ok(grpc.unary(call, req).await)
        })
    }
}

/// The proxy's two services (both CRI versions) forwarding to containerd
/// at `upstream`, lending PullImage's credentials to `keys`.
pub(crate) fn services(
    upstream: PathBuf,
    keys: Arc<Keyring>,
    metrics: Arc<Metrics>,
) -> (Forward<V1>, Forward<V1Alpha2>) {
    let up = Upstream::new(upstream, keys, metrics);
    (
        Forward {
            up: up.clone(),
            api: PhantomData,
        },
        Forward {
            up,
            api: PhantomData,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn pull(image: &str, auth: AuthConfig) -> Vec<u8> {
        PullImageRequest {
            image: Some(ImageSpec {
                image: image.into(),
            }),
            auth: Some(auth),
        }
        .encode_to_vec()
    }

    /// kubelet's credentials are lent for the image's repository while
    /// the Lent lives, only to the host `server_address` names, and in the
    /// forms kubelet sends them.
    #[test]
    fn a_pull_lends_its_credentials_while_it_runs() {
        use base64::Engine;
        let keys = Arc::new(Keyring::default());
        let body = pull(
            "127.0.0.1:5000/team/app:v1",
            AuthConfig {
                username: "alice".into(),
                password: "s3cret".into(),
                ..Default::default()
            },
        );
        let lent = lend(&keys, &body).expect("lent");
        let got = keys.get("127.0.0.1:5000", "team/app", "127.0.0.1:5000");
        assert!(
            matches!(&got, Some(Secret::Password(c)) if c.user == "alice" && c.password == "s3cret")
        );
        assert!(keys
            .get("127.0.0.1:5000", "team/other", "127.0.0.1:5000")
            .is_none());
        assert!(!format!("{got:?}").contains("s3cret"));
        drop(lent);
        assert!(keys.is_empty());

        let b64 = base64::engine::general_purpose::STANDARD.encode("bob:pw:with:colons");
        let _l = lend(
            &keys,
            &pull(
                "docker.io/library/redis",
                AuthConfig {
                    auth: b64,
                    server_address: "https://registry.example:444/v2/".into(),
                    ..Default::default()
                },
            ),
        )
        .expect("lent");
        let image = Reference::parse("docker.io/library/redis").unwrap();
        assert!(keys
            .get(&image.registry, &image.repository, "registry-1.docker.io")
            .is_none());
        // Docker Hub's names are one: kubelet names it by its v1 index.
        let _h = lend(
            &keys,
            &pull(
                "docker.io/library/busybox",
                AuthConfig {
                    username: "hub".into(),
                    password: "pw".into(),
                    server_address: "https://index.docker.io/v1/".into(),
                    ..Default::default()
                },
            ),
        )
        .expect("lent");
        let bb = Reference::parse("busybox").unwrap();
        assert!(keys
            .get(&bb.registry, &bb.repository, "registry-1.docker.io")
            .is_some());
        assert!(matches!(
            keys.get(&image.registry, &image.repository, "registry.example:444"),
            Some(Secret::Password(c)) if c.password == "pw:with:colons"
        ));
        let _t = lend(
            &keys,
            &pull(
                "quay.io/x/y",
                AuthConfig {
                    identity_token: "idt".into(),
                    ..Default::default()
                },
            ),
        );
        assert!(matches!(
            keys.get("quay.io", "x/y", "quay.io"),
            Some(Secret::IdentityToken(t)) if t == "idt"
        ));
        // Nothing to lend: no auth, an empty one, junk.
        assert!(lend(&keys, &pull("quay.io/x/z", AuthConfig::default())).is_none());
        assert!(lend(&keys, b"\xff\xff\xff").is_none());
        assert_eq!(keys.len(), 3);
    }

    #[test]
    fn grpc_timeouts_parse() {
        use std::time::Duration;
        assert_eq!(grpc_timeout("120S"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout("5m"), Some(Duration::from_millis(5)));
        assert_eq!(grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout(""), None);
        assert_eq!(grpc_timeout("S"), None);
        assert_eq!(grpc_timeout("99999999999999999999H"), None);
    }
}
