-- GET <prefix><random id>, ids read from the file given as the first script argument. A third
-- argument names a file of bearer tokens (one a line): each request carries a random one of them.
local ids = {}
local tokens = {}
local prefix = "/"
function init(args)
  for line in io.lines(args[1]) do ids[#ids + 1] = line end
  prefix = args[2]
  if args[3] then
    for line in io.lines(args[3]) do tokens[#tokens + 1] = "Bearer " .. line end
  end
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
end
function request()
  local path = prefix .. ids[math.random(#ids)]
  if #tokens == 0 then return wrk.format("GET", path) end
  return wrk.format("GET", path, {["Authorization"] = tokens[math.random(#tokens)]})
end
