-- tally forward-auth for HAProxy 2.6+ (Lua 5.3, core.httpclient).
--
-- `http-request lua.tally_check` asks tally's /v1/forward-auth with the request's
-- attributes and sets txn.tally_allowed ("true"/"false"), txn.tally_denied_by and
-- txn.tally_retry_after for the deny rule in haproxy.cfg. If tally cannot be reached,
-- the request is allowed (fail open) and the error is logged: change FAIL_OPEN to false
-- to deny instead.
local TALLY_URL = os.getenv("TALLY_URL") or "http://127.0.0.1:7070"
local TALLY_TOKEN = os.getenv("TALLY_TOKEN") or "CLIENT_TOKEN"
local FAIL_OPEN = true

core.register_action("tally_check", { "http-req" }, function(txn)
    local headers = {
        ["authorization"] = { "Bearer " .. TALLY_TOKEN },
    }
    local key = txn.sf:req_hdr("x-api-key")
    if key ~= nil and key ~= "" then
        headers["x-tally-attr-virtual-key"] = { key }
    end
    local hc = core.httpclient()
    local res = hc:get({ url = TALLY_URL .. "/v1/forward-auth", headers = headers, timeout = 2000 })
    if res == nil or res.status == nil or res.status == 0 or res.status >= 500 then
        core.Warning("tally: forward-auth failed; " .. (FAIL_OPEN and "allowing" or "denying"))
        txn:set_var("txn.tally_allowed", FAIL_OPEN and "true" or "false")
        return
    end
    if res.status >= 200 and res.status < 300 then
        txn:set_var("txn.tally_allowed", "true")
        return
    end
    local function first(name)
        local h = res.headers and res.headers[name]
        if h == nil then return "" end
        if type(h) == "table" then return h[0] or h[1] or "" end
        return h
    end
    -- A refusal that is not a budget decision (bad token, bad header) also denies, loudly.
    if first("x-tally-allowed") ~= "false" then
        core.Warning("tally: forward-auth refused the request (" .. res.status .. "): check TALLY_TOKEN and the headers")
    end
    txn:set_var("txn.tally_allowed", "false")
    txn:set_var("txn.tally_denied_by", first("x-tally-denied-by"))
    txn:set_var("txn.tally_retry_after", first("retry-after"))
end, 0)
