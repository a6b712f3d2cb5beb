//! What grpcurl shows: it asks server reflection for the descriptors and prints messages as proto3 JSON
//! (lowerCamelCase keys, 64-bit integers as strings, zero values omitted). grpcurl itself cannot be installed
//! on this machine, so this test does what it does with prost-reflect, against the real server.
#![allow(clippy::unwrap_used)]

mod common;

use common::CommandApp;
use kiroku::v1::{WatchEventsRequest, watch_events_request, watch_events_response};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn watch_events_from_the_beginning_prints_readable_json_through_reflection() {
    let app = CommandApp::spawn().await;
    let (query, client) = app.start_query(&[]).await;
    app.github_knows(583231, "octocat", Some("The Octocat")).await;
    let registered = app.register(583231, "req-42").await.unwrap();

    // Like grpcurl: the descriptors come from the server's reflection service.
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", query.address)).unwrap().connect().await.unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let mut protos: Vec<prost_types::FileDescriptorProto> = Vec::new();
    let mut wanted = vec![MessageRequest::FileContainingSymbol("kiroku.v1.QueryService".into())];
    // Ask for the service's file, then for every dependency not received yet, as grpcurl does.
    while let Some(request) = wanted.pop() {
        let request = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
        let mut responses =
            reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
        let response = responses.message().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::FileDescriptorResponse(files)) = response else {
            panic!("reflection did not answer with descriptors: {response:?}");
        };
        for bytes in &files.file_descriptor_proto {
            let proto = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
            if protos.iter().all(|p| p.name != proto.name) {
                protos.push(proto);
            }
        }
        for dependency in protos.iter().flat_map(|p| p.dependency.clone()) {
            if protos.iter().all(|p| p.name() != dependency) {
                wanted.push(MessageRequest::FileByFilename(dependency));
            }
        }
    }
    let mut pool = DescriptorPool::new();
    pool.add_file_descriptor_protos(protos).unwrap();
    let descriptor = pool.get_message_by_name("kiroku.v1.WatchEventsResponse").unwrap();

    let mut stream = client
        .clone()
        .watch_events(WatchEventsRequest {
            start: Some(watch_events_request::Start::FromBeginning(true)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let message = loop {
        let message = stream.message().await.unwrap().unwrap();
        if matches!(message.kind, Some(watch_events_response::Kind::Event(_))) {
            break message;
        }
    };
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice()).unwrap();
    let json = serde_json::to_value(&dynamic).unwrap();
    let event = &json["event"];
    assert_eq!(event["position"], registered.position.to_string(), "64-bit integers print as strings: {json}");
    assert_eq!(event["eventType"], "UserRegistered");
    assert_eq!(event["aggregateType"], "User");
    assert_eq!(event["aggregateId"], registered.user_id);
    assert_eq!(event["version"], "1");
    assert!(event["occurredAt"].as_str().unwrap().ends_with('Z'), "timestamps print as RFC 3339");
    assert_eq!(event["data"]["personal"]["github_username"], "octocat", "payload keys stay snake_case");
    assert_eq!(event["metadata"]["request_id"], "req-42");
    query.stop().await;
    app.stop().await;
}
