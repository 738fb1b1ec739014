//! Group management: the seven group requests, and receipt detail. Each is answered once the
//! change (and its event in the group's conversation) is durable; the
//! events themselves arrive on [`Events`](crate::Events) like messages.

use starling_protocol::v1::{self, frame::Body};

use super::Client;
use crate::error::ClientError;

impl Client {
    /// Creates a group named `name` with the caller as its first admin and
    /// `member_user_ids` as members.
    pub async fn create_group(
        &self,
        name: &str,
        member_user_ids: &[u64],
    ) -> Result<v1::GroupInfo, ClientError> {
        self.group_request(Body::CreateGroup(v1::CreateGroup {
            name: name.to_owned(),
            member_user_ids: member_user_ids.to_vec(),
            avatar: None,
        }))
        .await
    }

    /// A group's current state (members only).
    pub async fn group_info(&self, conversation_id: u64) -> Result<v1::GroupInfo, ClientError> {
        self.group_request(Body::GetGroupInfo(v1::GetGroupInfo { conversation_id }))
            .await
    }

    /// Adds members (admins only).
    pub async fn add_group_members(
        &self,
        conversation_id: u64,
        user_ids: &[u64],
    ) -> Result<v1::GroupInfo, ClientError> {
        self.group_request(Body::AddGroupMembers(v1::AddGroupMembers {
            conversation_id,
            user_ids: user_ids.to_vec(),
        }))
        .await
    }

    /// Removes members (admins only).
    pub async fn remove_group_members(
        &self,
        conversation_id: u64,
        user_ids: &[u64],
    ) -> Result<v1::GroupInfo, ClientError> {
        self.group_request(Body::RemoveGroupMembers(v1::RemoveGroupMembers {
            conversation_id,
            user_ids: user_ids.to_vec(),
        }))
        .await
    }

    /// Changes a member's role (admins only).
    pub async fn set_group_role(
        &self,
        conversation_id: u64,
        user_id: u64,
        role: v1::GroupRole,
    ) -> Result<v1::GroupInfo, ClientError> {
        self.group_request(Body::SetGroupRole(v1::SetGroupRole {
            conversation_id,
            user_id,
            role: role.into(),
        }))
        .await
    }

    /// Leaves a group. The last admin must make another member admin
    /// first.
    pub async fn leave_group(&self, conversation_id: u64) -> Result<(), ClientError> {
        match self
            .request(Body::LeaveGroup(v1::LeaveGroup { conversation_id }))
            .await?
        {
            Body::Done(_) | Body::GroupInfo(_) => Ok(()),
            other => Err(ClientError::unexpected("Done", Some(&other))),
        }
    }

    /// Changes group settings (admins only); only the fields set in
    /// `update` change. `update.conversation_id` names the group.
    pub async fn update_group(
        &self,
        update: v1::UpdateGroup,
    ) -> Result<v1::GroupInfo, ClientError> {
        self.group_request(Body::UpdateGroup(update)).await
    }

    /// Who received and read message `seq` of a conversation (members
    /// who may see it only).
    pub async fn receipts(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> Result<v1::ReceiptDetail, ClientError> {
        match self
            .request(Body::GetReceipts(v1::GetReceipts {
                conversation_id,
                seq,
            }))
            .await?
        {
            Body::ReceiptDetail(d) => Ok(d),
            other => Err(ClientError::unexpected("ReceiptDetail", Some(&other))),
        }
    }

    async fn group_request(&self, body: Body) -> Result<v1::GroupInfo, ClientError> {
        match self.request(body).await? {
            Body::GroupInfo(g) => Ok(g),
            other => Err(ClientError::unexpected("GroupInfo", Some(&other))),
        }
    }
}
