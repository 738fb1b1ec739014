//! `push register|unregister`: this device's push token.

use clap::{Subcommand, ValueEnum};
use serde_json::json;
use starling_client::{Client, ClientError, PushToken};

use super::out::Out;

/// A push service.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Platform {
    /// Apple Push Notification service (token in hex; --app-id is the bundle id).
    Apns,
    /// Firebase Cloud Messaging (the registration token).
    Fcm,
    /// Web Push (the token is the browser's subscription JSON).
    WebPush,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PushCmd {
    /// Register this device's push token (replacing the one it had).
    Register {
        /// The push service.
        #[arg(long, value_enum)]
        platform: Platform,
        /// The token (Web Push: the subscription JSON).
        #[arg(long)]
        token: String,
        /// The app's bundle / package id (required for APNs: the apns-topic).
        #[arg(long, default_value = "")]
        app_id: String,
        /// APNs: the development (sandbox) environment.
        #[arg(long)]
        sandbox: bool,
    },
    /// Forget this device's push token.
    Unregister,
}

/// Runs a push command.
pub(crate) async fn run(out: &Out, client: &Client, cmd: PushCmd) -> Result<(), ClientError> {
    match cmd {
        PushCmd::Register {
            platform,
            token,
            app_id,
            sandbox,
        } => {
            if sandbox && !matches!(platform, Platform::Apns) {
                return Err(ClientError::InvalidArgument(
                    "--sandbox is for --platform apns only".into(),
                ));
            }
            let t = match platform {
                Platform::Apns => PushToken::Apns {
                    token,
                    bundle_id: app_id,
                    sandbox,
                },
                Platform::Fcm => PushToken::Fcm { token, app_id },
                Platform::WebPush => PushToken::WebPush {
                    subscription_json: token,
                },
            };
            client.register_push_token(&t).await?;
            let name = match platform {
                Platform::Apns => "apns",
                Platform::Fcm => "fcm",
                Platform::WebPush => "web_push",
            };
            out.print(&json!({
                "type": "push_registered",
                "device_id": client.device_id(),
                "platform": name,
            }));
        }
        PushCmd::Unregister => {
            client.unregister_push_token().await?;
            out.print(&json!({ "type": "push_unregistered", "device_id": client.device_id() }));
        }
    }
    Ok(())
}
