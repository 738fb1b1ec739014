//! Signing in: one-time codes, login, and the stored session they produce.

use starling_protocol::v1::{self, frame::Body};

use super::{Client, Identifier, LoginCredential};
use crate::connection::{ConnectOptions, Connection};
use crate::error::ClientError;
use crate::store::{Credentials, Profile};

impl Client {
    /// Asks the server to send a one-time code to `identifier`.
    pub async fn request_otp(
        connect: &ConnectOptions,
        identifier: &Identifier,
    ) -> Result<v1::OtpSent, ClientError> {
        let (conn, _pushes, _) = Connection::connect_hello(connect, None).await?;
        let res = conn
            .request(Body::RequestOtp(v1::RequestOtp {
                identifier: Some(identifier.to_wire()),
            }))
            .await;
        conn.close();
        match res? {
            Body::OtpSent(s) => Ok(s),
            other => Err(ClientError::unexpected("OtpSent", Some(&other))),
        }
    }

    /// Verifies a one-time code (registering the user if new) and stores
    /// the new session in `profile`.
    pub async fn verify_otp(
        connect: &ConnectOptions,
        profile: &Profile,
        identifier: &Identifier,
        code: &str,
        display_name: &str,
        device: v1::DeviceInfo,
    ) -> Result<v1::SessionGranted, ClientError> {
        let body = Body::VerifyOtp(v1::VerifyOtp {
            identifier: Some(identifier.to_wire()),
            code: code.to_owned(),
            device: Some(device),
            display_name: display_name.to_owned(),
        });
        Self::sign_in(connect, profile, body).await
    }

    /// Signs in an existing user and stores the new session in `profile`.
    pub async fn login(
        connect: &ConnectOptions,
        profile: &Profile,
        identifier: &Identifier,
        credential: LoginCredential,
        device: v1::DeviceInfo,
    ) -> Result<v1::SessionGranted, ClientError> {
        use v1::login::Credential;
        let body = Body::Login(v1::Login {
            identifier: Some(identifier.to_wire()),
            credential: Some(match credential {
                LoginCredential::OtpCode(c) => Credential::OtpCode(c),
                LoginCredential::Password(p) => Credential::Password(p),
            }),
            device: Some(device),
        });
        Self::sign_in(connect, profile, body).await
    }

    async fn sign_in(
        connect: &ConnectOptions,
        profile: &Profile,
        body: Body,
    ) -> Result<v1::SessionGranted, ClientError> {
        let (conn, _pushes, _) = Connection::connect_hello(connect, None).await?;
        let res = conn.request(body).await;
        conn.close();
        match res? {
            Body::SessionGranted(g) => {
                profile.save_credentials(&Credentials::from(&g))?;
                Ok(g)
            }
            other => Err(ClientError::unexpected("SessionGranted", Some(&other))),
        }
    }
}
