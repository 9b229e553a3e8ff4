-- Forgetting a member's history must not reset their cooldown either: carry their last request time.
ALTER TABLE forgotten_usage ADD COLUMN last_request_at double precision;
