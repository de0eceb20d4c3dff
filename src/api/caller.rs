//! Whose request this is: in cloud mode the tenant of the authenticated key, in local mode the
//! one local tenant.

use std::future::{Ready, ready};

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, web};

use super::AppState;
use super::errors::ApiError;
use crate::auth::middleware::principal_of;
use crate::domain::UserId;
use crate::store::Owner;

pub struct Caller {
    pub tenant: String,
    pub api_key_id: Option<String>,
}

impl Caller {
    pub fn owner(&self, user_id: UserId) -> Owner {
        Owner {
            tenant: self.tenant.clone(),
            user_id,
        }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        if let Some(principal) = principal_of(req) {
            return ready(Ok(Caller {
                tenant: principal.tenant_id,
                api_key_id: Some(principal.key_id.to_string()),
            }));
        }
        let local = req
            .app_data::<web::Data<AppState>>()
            .and_then(|state| state.local_tenant.clone());
        ready(match local {
            Some(tenant) => Ok(Caller {
                tenant,
                api_key_id: None,
            }),
            None => Err(ApiError::invalid_api_key()),
        })
    }
}
