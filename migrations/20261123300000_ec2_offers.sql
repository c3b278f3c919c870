-- The ec2 engine's cache of instance types and prices per region, refreshed by workers (DescribeInstanceTypes,
-- DescribeSpotPriceHistory, the operator's on-demand price list). Workers choose instance types from it and the
-- API's price check answers from it, so the API never calls AWS.
CREATE TABLE ec2_offers (
    region              text NOT NULL,
    instance_type       text NOT NULL,
    vcpus               integer NOT NULL,
    memory_mib          bigint NOT NULL,
    architectures       text[] NOT NULL,
    burstable           boolean NOT NULL,
    instance_storage_gb integer NOT NULL,
    current_generation  boolean NOT NULL,
    spot_supported      boolean NOT NULL,
    -- latest spot price (USD/hour) per availability zone
    spot_prices         jsonb NOT NULL DEFAULT '{}',
    on_demand_price     double precision,
    PRIMARY KEY (region, instance_type)
);

-- When each region's offers were last refreshed (one row per region, replaced with its offers).
CREATE TABLE ec2_offer_regions (
    region       text PRIMARY KEY,
    refreshed_at timestamptz NOT NULL,
    types        integer NOT NULL
);
