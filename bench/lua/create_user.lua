-- POST a user with a unique email (a random tag per thread + the thread's number + a counter). The
-- first script argument, if any, is a file whose first line is a bearer token every request carries.
-- The thread's number matters: both threads seed from the same clock and could draw the same tag, and
-- a repeated email is a 409, not the insert being measured.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end
local counter = 0
local tag = ""
local headers = {["Content-Type"] = "application/json"}
function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000) + thread_number)
  tag = tostring(math.random(1, 1000000000)) .. "-" .. tostring(thread_number)
  if args[1] then headers["Authorization"] = "Bearer " .. io.lines(args[1])() end
end
function request()
  counter = counter + 1
  local body = '{"email":"wrk-' .. tag .. '-' .. counter .. '@example.com","first_name":"Bench","last_name":"User"}'
  return wrk.format("POST", wrk.path, headers, body)
end
