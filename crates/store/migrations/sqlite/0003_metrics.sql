-- /metrics counts interrupted attempts (lease expiries) on every scrape.
CREATE INDEX attempts_interrupted ON attempts (id) WHERE outcome = 'interrupted';
