-- POST a user with a unique email (thread id + counter + random tag). The first script argument, if
-- any, is a file whose first line is a bearer token every request carries.
local counter = 0
local tag = ""
local headers = {["Content-Type"] = "application/json"}
function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
  tag = tostring(math.random(1, 1000000000))
  if args[1] then headers["Authorization"] = "Bearer " .. io.lines(args[1])() end
end
function request()
  counter = counter + 1
  local body = '{"email":"wrk-' .. tag .. '-' .. counter .. '@example.com","first_name":"Bench","last_name":"User"}'
  return wrk.format("POST", wrk.path, headers, body)
end
