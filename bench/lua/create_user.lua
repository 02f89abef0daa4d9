-- POST a user with a unique email (thread id + counter + random tag).
local counter = 0
local tag = ""
function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
  tag = tostring(math.random(1, 1000000000))
end
function request()
  counter = counter + 1
  local body = '{"email":"wrk-' .. tag .. '-' .. counter .. '@example.com","first_name":"Bench","last_name":"User"}'
  return wrk.format("POST", wrk.path, {["Content-Type"] = "application/json"}, body)
end
