"""The seed's push source: ad impression events keyed by user, as `make run` applies it."""

from datetime import timedelta

from featurepush import Field, Int64, PushConfig, StreamSource, String, Timestamp

input_schema = [
    Field("user_id", String),
    Field("timestamp", Timestamp),
    Field("clicked", Int64),
]

impressions_event_source = StreamSource(
    name="ad_impressions",
    description="Sample push source for ad impression events",
    schema=input_schema,
    entity_keys=["user_id"],
    timestamp_field="timestamp",
    stream_config=PushConfig(log_offline=False),
    online_ttl=timedelta(days=30),
    owner="ads-ml",
    tags={"team": "ads"},
)
