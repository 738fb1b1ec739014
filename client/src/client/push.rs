//! Push notifications: registering this device's push token, so that the server wakes it
//! (with a content-free notification) when it has something for it and no live connection.

use starling_protocol::v1::{self, frame::Body};

use super::Client;
use crate::error::ClientError;

/// A device's push token, per push service (what `RegisterPushToken` carries; the server's
/// checks are specified on it in `push.proto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushToken {
    /// Apple Push Notification service.
    Apns {
        /// The device token, in hex.
        token: String,
        /// The app's bundle id (the `apns-topic`).
        bundle_id: String,
        /// The development (sandbox) environment.
        sandbox: bool,
    },
    /// Firebase Cloud Messaging.
    Fcm {
        /// The registration token.
        token: String,
        /// The app's package name (informational).
        app_id: String,
    },
    /// Web Push (RFC 8030).
    WebPush {
        /// The browser's `PushSubscription`, as JSON (`endpoint`, `keys.p256dh`,
        /// `keys.auth`).
        subscription_json: String,
    },
}

impl PushToken {
    /// The request that registers it.
    #[must_use]
    pub fn to_request(&self) -> v1::RegisterPushToken {
        match self {
            PushToken::Apns {
                token,
                bundle_id,
                sandbox,
            } => v1::RegisterPushToken {
                platform: v1::PushPlatform::Apns as i32,
                token: token.clone(),
                app_id: bundle_id.clone(),
                sandbox: *sandbox,
            },
            PushToken::Fcm { token, app_id } => v1::RegisterPushToken {
                platform: v1::PushPlatform::Fcm as i32,
                token: token.clone(),
                app_id: app_id.clone(),
                sandbox: false,
            },
            PushToken::WebPush { subscription_json } => v1::RegisterPushToken {
                platform: v1::PushPlatform::WebPush as i32,
                token: subscription_json.clone(),
                app_id: String::new(),
                sandbox: false,
            },
        }
    }
}

impl Client {
    /// Registers this device's push token (replacing the one it had); durable on the server
    /// when this returns. A token the server finds malformed is refused with
    /// `INVALID_ARGUMENT` ([`ClientError::Server`]), naming what is wrong.
    pub async fn register_push_token(&self, token: &PushToken) -> Result<(), ClientError> {
        self.expect_done(Body::RegisterPushToken(token.to_request()))
            .await
    }

    /// Forgets this device's push token (done also when it had none).
    pub async fn unregister_push_token(&self) -> Result<(), ClientError> {
        self.expect_done(Body::UnregisterPushToken(v1::UnregisterPushToken {}))
            .await
    }
}
