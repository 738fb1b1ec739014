//! Group management: the seven group requests, and receipt detail. Each is answered once the
//! change (and its event in the group's conversation) is durable; the
//! events themselves arrive on [`Events`](crate::Events) like messages.

use starling_protocol::v1::{self, frame::Body};

use super::Client;
use crate::error::ClientError;

/// How many times [`Client::group_info`] starts over when the group changes
/// while its pages are read.
const GROUP_INFO_ATTEMPTS: u32 = 4;

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

    /// A group's current state with every member (members only): one
    /// request per page of the server's page size (1,024 members by
    /// default). When the group changes while its pages are read, the read
    /// starts over (at most 4 reads; the last one's
    /// pages are returned as read). The answer's
    /// `members_next_after_user_id` is 0.
    pub async fn group_info(&self, conversation_id: u64) -> Result<v1::GroupInfo, ClientError> {
        let mut attempt = 0;
        'read: loop {
            attempt += 1;
            let mut info = self.group_info_page(conversation_id, 0, 0).await?;
            while info.members_next_after_user_id != 0 {
                let after = info.members_next_after_user_id;
                let page = self.group_info_page(conversation_id, after, 0).await?;
                if page.version != info.version && attempt < GROUP_INFO_ATTEMPTS {
                    continue 'read;
                }
                info.members.extend(page.members);
                info.members_next_after_user_id = page.members_next_after_user_id;
                info.member_count = page.member_count;
            }
            return Ok(info);
        }
    }

    /// One page of a group's members: those after `after_user_id` (0: from
    /// the first), at most `limit` (0: the server's page size). More follow
    /// when the answer's `members_next_after_user_id` is not 0.
    pub async fn group_info_page(
        &self,
        conversation_id: u64,
        after_user_id: u64,
        limit: u32,
    ) -> Result<v1::GroupInfo, ClientError> {
        self.group_request(Body::GetGroupInfo(v1::GetGroupInfo {
            conversation_id,
            members_after_user_id: after_user_id,
            members_limit: limit,
        }))
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
    /// who may see it only), every page of it; the counts are those of the
    /// last page read.
    pub async fn receipts(
        &self,
        conversation_id: u64,
        seq: u64,
    ) -> Result<v1::ReceiptDetail, ClientError> {
        let mut d = self.receipts_page(conversation_id, seq, 0, 0).await?;
        while d.next_after_user_id != 0 {
            let page = self
                .receipts_page(conversation_id, seq, d.next_after_user_id, 0)
                .await?;
            d.delivered_user_ids.extend(page.delivered_user_ids);
            d.read_user_ids.extend(page.read_user_ids);
            (d.recipients, d.delivered, d.read) = (page.recipients, page.delivered, page.read);
            d.next_after_user_id = page.next_after_user_id;
        }
        Ok(d)
    }

    /// One page of [`receipts`](Self::receipts): the recipients after
    /// `after_user_id`, at most `limit` of them (0: the server's page size).
    pub async fn receipts_page(
        &self,
        conversation_id: u64,
        seq: u64,
        after_user_id: u64,
        limit: u32,
    ) -> Result<v1::ReceiptDetail, ClientError> {
        match self
            .request(Body::GetReceipts(v1::GetReceipts {
                conversation_id,
                seq,
                after_user_id,
                limit,
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
