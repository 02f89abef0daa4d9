-- POST an event for a random existing user (ids from the file given as the first script argument).
local ids = {}
function init(args)
  for line in io.lines(args[1]) do ids[#ids + 1] = line end
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end
function request()
  local body = '{"user_id":"' .. ids[math.random(#ids)] .. '","type":"bench","data":{"action":"login","n":1}}'
  return wrk.format("POST", wrk.path, {["Content-Type"] = "application/json"}, body)
end
