//! SyncGitHubProfile: a signed-in user's profile read again from GitHub (conditionally, with the stored ETag), and
//! `UserProfileUpdated` appended when the login, name or avatar changed; "no change" is an answer too.

use kiroku_domain::{SyncProfile, UserCommand};

use crate::commands::{Call, Commands, rpc};
use crate::error::CommandError;
use crate::github::Fetched;
use crate::pipeline::{Answer, Order, Prepared, Target};

impl Commands {
    pub(crate) async fn sync_github_profile(
        &self,
        token: &str,
        expected_version: u64,
        call: &Call,
    ) -> Result<Answer, CommandError> {
        let (subject, who) = self.signed_in(token).await?;
        let order = Order {
            rpc: rpc::SYNC_GITHUB_PROFILE,
            who,
            content: vec![expected_version.to_string()],
            target: Target::HolderOf(subject.clone()),
            expected_version,
        };
        let intent = UserCommand::SyncProfile(SyncProfile { profile: None, now: call.received_at });
        let pipeline = self.pipeline();
        pipeline
            .change_user(call, order, intent, |user, _, _| async move {
                // Every sync asks GitHub: limited per subject like refused registrations.
                let _attempt = self
                    .attempts
                    .take(&subject.to_string())
                    .map_err(|retry_after| CommandError::LimitReached { retry_after })?;
                let etag = user.personal.as_ref().and_then(|p| p.github_etag.as_deref());
                let profile = match self.github.fetch_user(subject.github_id(), etag).await? {
                    Fetched::Profile(profile) => Some(profile),
                    Fetched::NotModified => None,
                };
                let command = UserCommand::SyncProfile(SyncProfile { profile, now: call.received_at });
                Ok(Prepared { command, erasure: None })
            })
            .await
    }
}
