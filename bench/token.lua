-- wrk script: GET /v1/token/acct-NNNNN for a random account in [0, N), with the guard
-- header tokend requires. N is the script's first argument (default 100).
local accounts = 100

function init(args)
  if args[1] then accounts = tonumber(args[1]) end
  math.randomseed(os.time())
end

local headers = { ["Tokend-Request"] = "1" }

function request()
  return wrk.format("GET", string.format("/v1/token/acct-%05d", math.random(0, accounts - 1)), headers)
end
