"""Stream feature views over the seed's ad impressions: click counts and rates per user, and a service."""

from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
from ad_impressions import impressions_event_source

from featurepush import Aggregate, FeatureService, Field, Float64, Int64, StreamFeatureView


def click_value(table: pa.Table) -> pa.Table:
    """The same row-level transformation for pushed and backfilled batches: a click's value in cents."""
    return table.append_column("value", pc.multiply(pc.cast(table["clicked"], pa.float64()), 12.5))


user_clicks = StreamFeatureView(
    name="user_clicks",
    source=impressions_event_source,
    entities=["user_id"],
    transformation=click_value,
    schema=[Field("clicked", Int64), Field("value", Float64)],
    aggregations=[
        Aggregate("clicked", "count", timedelta(days=1)),
        Aggregate("clicked", "sum", timedelta(hours=1)),
        Aggregate("clicked", "sum", timedelta(days=1)),
        Aggregate("value", "mean", timedelta(days=7)),
        Aggregate("clicked", "last_n", timedelta(days=1), n=5),
    ],
    aggregation_interval=timedelta(hours=1),
    owner="ads-ml",
)

ads_ranking = FeatureService(name="ads_ranking", features=[user_clicks])
