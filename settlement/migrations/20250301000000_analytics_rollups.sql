-- Hourly and daily rollups of the per-minute analytics, maintained by the same fold
-- that writes the minutes (one transaction), so a query over days reads a row per
-- day and cell for the days it covers whole, hours for the whole hours at its edges
-- and minutes only for the partial hours: its cost no longer grows with the range.
-- Buckets are UTC (epoch multiples of 3600 and 86400 seconds).
CREATE TABLE analytics_hour (LIKE analytics_minute INCLUDING DEFAULTS);
ALTER TABLE analytics_hour RENAME COLUMN minute TO start;
ALTER TABLE analytics_hour ADD PRIMARY KEY (start, route, merchant, asset);

CREATE TABLE analytics_day (LIKE analytics_minute INCLUDING DEFAULTS);
ALTER TABLE analytics_day RENAME COLUMN minute TO start;
ALTER TABLE analytics_day ADD PRIMARY KEY (start, route, merchant, asset);

CREATE TABLE analytics_payer_day (LIKE analytics_payer_hour INCLUDING DEFAULTS);
ALTER TABLE analytics_payer_day RENAME COLUMN hour TO day;
ALTER TABLE analytics_payer_day ADD PRIMARY KEY (day, payer, merchant, asset);

-- Backfill from what is already folded (the statements of analytics::rebuild_rollups).
INSERT INTO analytics_hour
SELECT to_timestamp(floor(extract(epoch FROM minute) / 3600) * 3600), route, merchant, asset,
       sum(requests), sum(paid), sum(refused), sum(captures), sum(revenue), sum(fees), sum(voids),
       sum(expiries), sum(upstream_errors), sum(refunds), sum(refunded),
       (SELECT array_agg(s ORDER BY i) FROM (
          SELECT ((n - 1) % 40) + 1 AS i, sum(v)::bigint AS s
          FROM unnest(array_agg(latency)) WITH ORDINALITY AS u(v, n) GROUP BY 1) AS per_bucket)
FROM analytics_minute GROUP BY 1, 2, 3, 4;

INSERT INTO analytics_day
SELECT to_timestamp(floor(extract(epoch FROM start) / 86400) * 86400), route, merchant, asset,
       sum(requests), sum(paid), sum(refused), sum(captures), sum(revenue), sum(fees), sum(voids),
       sum(expiries), sum(upstream_errors), sum(refunds), sum(refunded),
       (SELECT array_agg(s ORDER BY i) FROM (
          SELECT ((n - 1) % 40) + 1 AS i, sum(v)::bigint AS s
          FROM unnest(array_agg(latency)) WITH ORDINALITY AS u(v, n) GROUP BY 1) AS per_bucket)
FROM analytics_hour GROUP BY 1, 2, 3, 4;

INSERT INTO analytics_payer_day
SELECT to_timestamp(floor(extract(epoch FROM hour) / 86400) * 86400), payer, merchant, asset,
       sum(payments), sum(spent)
FROM analytics_payer_hour GROUP BY 1, 2, 3, 4;
