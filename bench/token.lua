-- wrk script: GET /v1/token/acct-NNNNN for a random account in [0, N), with the guard
-- header tokend requires. N is the script's first argument (default 100). An optional
-- second argument, a comma-separated list of indices, restricts the reads to those
-- accounts (bench/ha.sh: the accounts a replica follows).
local accounts = 100
local list = nil

function init(args)
  if args[1] then accounts = tonumber(args[1]) end
  if args[2] and args[2] ~= "" then
    list = {}
    for i in string.gmatch(args[2], "%d+") do list[#list + 1] = tonumber(i) end
  end
  math.randomseed(os.time())
end

local headers = { ["Tokend-Request"] = "1" }

function request()
  local i
  if list then i = list[math.random(1, #list)] else i = math.random(0, accounts - 1) end
  return wrk.format("GET", string.format("/v1/token/acct-%05d", i), headers)
end
