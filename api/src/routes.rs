//! The route table: every path template, the methods it accepts and the endpoint each one runs.

use matchit::Router;

use crate::auth::Scope;

/// Every operation the api serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /health/live`
    HealthLive,
    /// `GET /health/ready`
    HealthReady,
    /// `GET /health`
    Health,
    /// `GET /metrics`
    Metrics,
    /// `GET /openapi.json`
    OpenApi,
    /// `GET /api/v1/users`
    ListUsers,
    /// `POST /api/v1/users`
    CreateUser,
    /// `GET /api/v1/users/{id}`
    GetUser,
    /// `PUT /api/v1/users/{id}`
    UpdateUser,
    /// `DELETE /api/v1/users/{id}`
    DeleteUser,
    /// `GET /api/v1/users/{id}/stats`
    UserStats,
    /// `GET /api/v1/events`
    ListEvents,
    /// `POST /api/v1/events`
    CreateEvent,
    /// `GET /api/v1/events/{id}`
    GetEvent,
}

impl Endpoint {
    /// The scope a caller's token must grant (SPEC §8); `None`: open to anyone (probes, metrics, the
    /// OpenAPI document). A new endpoint must decide here: the match has no catch-all.
    pub const fn scope(self) -> Option<Scope> {
        match self {
            Self::HealthLive | Self::HealthReady | Self::Health | Self::Metrics | Self::OpenApi => None,
            Self::ListUsers | Self::GetUser | Self::UserStats => Some(Scope::UsersRead),
            Self::CreateUser | Self::UpdateUser | Self::DeleteUser => Some(Scope::UsersWrite),
            Self::ListEvents | Self::GetEvent => Some(Scope::EventsRead),
            Self::CreateEvent => Some(Scope::EventsWrite),
        }
    }
}

/// Path template → (method → endpoint).
const TABLE: &[(&str, &[(&str, Endpoint)])] = &[
    ("/health/live", &[("GET", Endpoint::HealthLive)]),
    ("/health/ready", &[("GET", Endpoint::HealthReady)]),
    ("/health", &[("GET", Endpoint::Health)]),
    ("/metrics", &[("GET", Endpoint::Metrics)]),
    ("/openapi.json", &[("GET", Endpoint::OpenApi)]),
    ("/api/v1/users", &[("GET", Endpoint::ListUsers), ("POST", Endpoint::CreateUser)]),
    (
        "/api/v1/users/{id}",
        &[("GET", Endpoint::GetUser), ("PUT", Endpoint::UpdateUser), ("DELETE", Endpoint::DeleteUser)],
    ),
    ("/api/v1/users/{id}/stats", &[("GET", Endpoint::UserStats)]),
    ("/api/v1/events", &[("GET", Endpoint::ListEvents), ("POST", Endpoint::CreateEvent)]),
    ("/api/v1/events/{id}", &[("GET", Endpoint::GetEvent)]),
];

struct Resource {
    template: &'static str,
    methods: &'static [(&'static str, Endpoint)],
    allow: String,
}

/// The outcome of looking a request up.
#[derive(Debug, PartialEq, Eq)]
pub enum RouteMatch {
    /// Path and method matched.
    Found {
        /// What to run.
        endpoint: Endpoint,
        /// The path template, for logs and metrics (never the raw path).
        template: &'static str,
        /// The `{id}` segment, if the template has one.
        id: Option<String>,
    },
    /// The path exists but not with this method.
    MethodNotAllowed {
        /// The path template.
        template: &'static str,
        /// Value of the `Allow` header.
        allow: String,
    },
    /// No template matches the path.
    NotFound,
}

/// The compiled route table; built once at start.
pub struct Routes(Router<Resource>);

impl Routes {
    /// Compiles [`TABLE`]. A conflicting template is a programming error, caught by the unit test.
    pub fn new() -> Result<Self, matchit::InsertError> {
        let mut router = Router::new();
        for &(template, methods) in TABLE {
            let allow = methods.iter().map(|(method, _)| *method).collect::<Vec<_>>().join(", ");
            router.insert(template, Resource { template, methods, allow })?;
        }
        Ok(Self(router))
    }

    /// Finds the endpoint for a method and path. A trailing slash is ignored.
    pub fn lookup(&self, method: &str, path: &str) -> RouteMatch {
        let path = match path.strip_suffix('/') {
            Some(stripped) if !stripped.is_empty() => stripped,
            _ => path,
        };
        let Ok(matched) = self.0.at(path) else {
            return RouteMatch::NotFound;
        };
        let resource = matched.value;
        match resource.methods.iter().find(|(name, _)| *name == method) {
            Some(&(_, endpoint)) => RouteMatch::Found {
                endpoint,
                template: resource.template,
                id: matched.params.get("id").map(str::to_owned),
            },
            None => RouteMatch::MethodNotAllowed { template: resource.template, allow: resource.allow.clone() },
        }
    }

    /// Every endpoint with its path template and method.
    pub fn endpoints() -> impl Iterator<Item = (Endpoint, &'static str, &'static str)> {
        TABLE.iter().flat_map(|&(template, methods)| {
            methods.iter().map(move |&(method, endpoint)| (endpoint, template, method))
        })
    }

    /// Every path template with its methods, for checking the OpenAPI document against the router.
    pub fn table() -> impl Iterator<Item = (&'static str, Vec<&'static str>)> {
        TABLE.iter().map(|(template, methods)| (*template, methods.iter().map(|(method, _)| *method).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(routes: &Routes, method: &str, path: &str) -> Option<(Endpoint, Option<String>)> {
        match routes.lookup(method, path) {
            RouteMatch::Found { endpoint, id, .. } => Some((endpoint, id)),
            _ => None,
        }
    }

    #[test]
    fn table_compiles_and_every_route_resolves() {
        let routes = Routes::new().unwrap();
        for &(template, methods) in TABLE {
            let path = template.replace("{id}", "abc");
            for &(method, endpoint) in methods {
                assert_eq!(found(&routes, method, &path).map(|f| f.0), Some(endpoint), "{method} {path}");
            }
        }
    }

    /// The document served at /openapi.json describes exactly the routes the router has.
    #[test]
    fn openapi_document_matches_the_router() {
        let document: serde_json::Value = serde_json::from_str(crate::OPENAPI_DOCUMENT).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        let documented: std::collections::BTreeSet<(String, String)> = document["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|key| *key != "parameters")
                    .map(|method| (path.clone(), method.to_uppercase()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let routed: std::collections::BTreeSet<(String, String)> = Routes::table()
            .flat_map(|(template, methods)| methods.into_iter().map(move |m| (template.to_owned(), m.to_owned())))
            .collect();
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(undocumented.is_empty(), "routes missing from docs/openapi.json: {undocumented:?}");
        assert!(unrouted.is_empty(), "docs/openapi.json documents routes that do not exist: {unrouted:?}");
    }

    /// Each operation's `security` in the OpenAPI document names exactly the scope the router demands.
    #[test]
    fn openapi_document_names_each_operations_scope() {
        let document: serde_json::Value = serde_json::from_str(crate::OPENAPI_DOCUMENT).unwrap();
        for (endpoint, template, method) in Routes::endpoints() {
            let security = &document["paths"][template][method.to_lowercase()]["security"];
            let expected = match endpoint.scope() {
                Some(scope) => serde_json::json!([{"bearer": [scope.as_str()]}]),
                None => serde_json::json!([]),
            };
            assert_eq!(security, &expected, "{method} {template}");
        }
    }

    #[test]
    fn trailing_slash_is_the_same_route() {
        let routes = Routes::new().unwrap();
        assert_eq!(found(&routes, "GET", "/api/v1/users/"), Some((Endpoint::ListUsers, None)));
        assert_eq!(found(&routes, "GET", "/api/v1/users/x/"), Some((Endpoint::GetUser, Some("x".into()))));
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        let routes = Routes::new().unwrap();
        assert_eq!(routes.lookup("GET", "/nope"), RouteMatch::NotFound);
        assert_eq!(routes.lookup("GET", "/"), RouteMatch::NotFound);
        assert_eq!(routes.lookup("GET", "/api/v1/users/a/b"), RouteMatch::NotFound);
        assert_eq!(
            routes.lookup("PATCH", "/api/v1/users/a"),
            RouteMatch::MethodNotAllowed { template: "/api/v1/users/{id}", allow: "GET, PUT, DELETE".into() }
        );
    }
}
